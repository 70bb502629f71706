"""The hooked model zoo: one module per model family, plus the registry of presets."""
