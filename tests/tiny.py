"""Test-side alias of model_zoo.tiny."""
from model_zoo.tiny import *  # noqa: F401,F403
from model_zoo.tiny import TOK, VOCAB, MEL, PATCH_DIM  # noqa: F401
