"""Model loading and generation: the real embedded models, and tiny random ones for mechanics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipes import PersonaError
from recipes.kit.backbones import DEFAULT_LLM, encoder_id, llm_id, resolve_device
from recipes.kit.generation import generate


def test_embedded_encoder_gives_normalized_384d_vectors(encoder):
    vectors = encoder.encode(["I love my bike", "Cycling is my favourite hobby", "The tax form is due"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    assert encoder.id == "all-MiniLM-L6-v2"


def test_embedded_llm_loads_from_its_cache_and_answers(llm):
    assert llm.id == DEFAULT_LLM and llm.model.config.num_hidden_layers == 30 and llm.model.config.hidden_size == 576
    [answer] = generate(llm, ["What is the capital of France? Answer in one word."], max_new_tokens=8)
    assert "paris" in answer.lower()


def test_ids_are_stable_for_the_defaults():
    assert encoder_id(None) == encoder_id("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert llm_id(None) == llm_id("HuggingFaceTB/SmolLM2-135M-Instruct") == DEFAULT_LLM


def test_device_selection():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PersonaError, match="expected auto, cpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PersonaError, match="no CUDA device"):
            resolve_device("cuda")


def test_batched_generation_matches_one_by_one(tiny_llama):
    prompts = ["short", "a much longer prompt with many more tokens in it", "mid length prompt"]
    batched = generate(tiny_llama, prompts, max_new_tokens=6, batch_size=3)
    single = [generate(tiny_llama, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and tiny_llama.tokenizer.padding_side == "left"


def test_generation_reports_progress(tiny_llama):
    seen = []
    generate(tiny_llama, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress=lambda *e: seen.append(e))
    assert seen[-1] == ("generating", 3, 3)


def test_seq2seq_path_with_a_tiny_t5(tiny_t5):
    assert tiny_t5.is_seq2seq and not tiny_t5.is_chat
    outputs = generate(tiny_t5, ["translate this", "and this one too"], max_new_tokens=4, batch_size=2)
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
