"""The real readers the format tests check our files with (whisper.cpp, gguf, GPTQModel, compressed-tensors, optimum):
test dependencies, so under CI a missing one fails; elsewhere its tests skip."""
import os

import pytest


def need(mod):
    "Import the real reader `mod`, or fail under CI / skip elsewhere when it is not installed."
    try: return __import__(mod)
    except ImportError:
        if os.environ.get('CI'): raise
        pytest.skip(f'{mod} is not installed (see the README test command)')
