"""examples/llama.py: its greedy text equals kvpager-llama's (the C reference engine) on the same
checkpoint, prompt, step count and cache spec, and the text the models' README records."""

import os
import subprocess
import sys

import pytest

from conftest import PYTHON_DIR, model_file

EXAMPLE = os.path.join(PYTHON_DIR, "examples", "llama.py")
COMPRESSED = "block=16,window=16,k=turboquant(bits=4),v=turboquant(bits=4)"
PROMPT = "And the LORD said unto Moses,"

# ../shared/models/README.md: the greedy stories260K story and kjv-64's continuation of PROMPT
STORIES_START = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                 "park. One day, she saw a big, r")
KJV_START = PROMPT + " What shall I beseech thee, and thou shalt not be ashamed.\nAnd the LORD said unto Moses,"


def run(argv):
    done = subprocess.run(argv, capture_output=True, env=os.environ, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode()


def example(model, steps, prompt="", cache=""):
    return run([sys.executable, EXAMPLE, "--model", model, "--steps", str(steps), "--prompt", prompt,
                "--cache", cache, "--quiet"])


def reference(model, steps, prompt="", cache=""):
    """kvpager-llama beside the library under test, or a skip saying where it was looked for."""
    tool = os.path.join(os.path.dirname(os.environ["KVPAGER_LIB"]), "kvpager-llama")
    if not os.access(tool, os.X_OK):
        pytest.skip(f"{tool} is not built (make {os.path.relpath(tool, os.path.dirname(PYTHON_DIR))})")
    return run([tool, "--model", model, "--steps", str(steps), "--prompt", prompt, "--cache", cache,
                "--plugin", os.environ["KVPAGER_LIB"], "--quiet"])


def test_stories260k_greedy_text_is_the_recorded_story():
    text = example(model_file("stories260K.bin"), 60)
    assert text.startswith(STORIES_START)


def test_kjv64_continues_the_prompt_as_recorded():
    text = example(model_file("kjv-64.bin"), 70, PROMPT)
    assert text.startswith(KJV_START)


@pytest.mark.parametrize("cache", ["", COMPRESSED], ids=["exact", "turboquant"])
@pytest.mark.parametrize("model,prompt,steps", [("stories260K.bin", "", 120),
                                                ("kjv-64.bin", PROMPT, 80)],
                         ids=["stories260K", "kjv-64"])
def test_greedy_text_equals_kvpager_llamas(model, prompt, steps, cache):
    path = model_file(model)
    expected = reference(path, steps, prompt, cache)
    assert example(path, steps, prompt, cache) == expected
    assert len(expected) > steps  # text, not an early stop


def test_a_cache_spec_the_library_refuses_exits_2_naming_it():
    done = subprocess.run([sys.executable, EXAMPLE, "--model", model_file("stories260K.bin"), "--steps", "2",
                           "--cache", "windoww=3"], capture_output=True, env=os.environ, timeout=60)
    assert done.returncode == 2
    assert b"windoww" in done.stderr


def test_a_prompt_with_byte_fallback_prints_as_kvpager_llama_does():
    """é is a piece of tok512, ✓ is not: its three bytes go through <0xHH> pieces, which the printer
    drops as lone non-ASCII bytes."""
    path, prompt = model_file("kjv-64.bin"), "And Moses said, é ✓"
    expected = reference(path, 40, prompt)
    assert example(path, 40, prompt) == expected
    assert "é" in expected and "✓" not in expected
