"""The paper's studies as pipelines over hooked_av recipes, with the command-line interface."""
