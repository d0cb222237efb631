"""PPlug mechanics on tiny random LLMs (causal and seq2seq) with the real input encoder: soft tokens
land where token embeddings would, every row of a mixed batch keeps its own, the embedder's
weights follow the formula, training moves only the embedder and resumes exactly."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from recipes.kit.backbones import Encoder
from recipes.kit.generation import generate, label_logprobs
from recipes.methods.pplug.serving import soft_tokens
from recipes.methods.pplug.training import PPlugExample, PPlugSettings, build_embedder, train_embedder
from recipes.methods.pplug.model import EmbedderShape, UserEmbedder, pad_histories
from recipes.kit.row_edits import PerRow
from recipes.kit.soft_prompts import SoftTokens, soft_prompt_ids, soft_start
from store import Behavior

PROMPTS = ["Paraphrase: the cat sat on the mat.", "Paraphrase: we walked to the old bridge at sunset today.", "hi"]


def _fresh(encoder: Encoder) -> Encoder:
    """Training changes the input encoder: give each test its own copy."""
    return dataclasses.replace(encoder, model=copy.deepcopy(encoder.model))


def _reference_greedy(llm, ids: list[int], max_new_tokens: int) -> str:
    """Greedy decoding by recomputing the whole sequence each step (no cache, no batching)."""
    stops = {llm.tokenizer.eos_token_id}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(llm.model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token in stops:
                break
            out.append(token)
    return llm.tokenizer.decode(out, skip_special_tokens=True).strip()


def test_soft_tokens_open_the_user_turn_of_a_chat_prompt(tiny_llama):
    ids, at = soft_prompt_ids(tiny_llama, PROMPTS[0], 2)
    tokenizer = tiny_llama.tokenizer
    assert at == soft_start(tiny_llama) > 0
    assert tokenizer.decode(ids[:at]).endswith("user\n")  # the chat header comes first
    assert tokenizer.decode(ids[at + 2 :]).startswith(PROMPTS[0])


def test_soft_tokens_equal_to_token_embeddings_generate_exactly_like_those_tokens(tiny_llama):
    """Rows of one batch, each with its own soft tokens, answer as if those tokens were in the prompt."""
    weight = tiny_llama.model.get_input_embeddings().weight
    chosen = [[101, 202], [303, 404], [505, 606]]
    soft = SoftTokens(weight[torch.tensor(chosen)].detach())
    answers = generate(tiny_llama, PROMPTS, max_new_tokens=6, batch_size=3, per_row=PerRow(soft=soft))
    for prompt, tokens, answer in zip(PROMPTS, chosen, answers):
        ids, at = soft_prompt_ids(tiny_llama, prompt, 2)
        ids[at : at + 2] = tokens
        assert answer == _reference_greedy(tiny_llama, ids, 6)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_t5"])
def test_a_mixed_user_batch_gives_each_row_what_it_gets_alone(model, request):
    llm = request.getfixturevalue(model)
    torch.manual_seed(3)
    norm = float(llm.model.get_input_embeddings().weight.norm(dim=-1).mean())
    vectors = torch.nn.functional.normalize(torch.randn(3, 2, llm.model.get_input_embeddings().weight.shape[1]), dim=-1) * norm
    batch = generate(llm, PROMPTS, max_new_tokens=5, batch_size=3, per_row=PerRow(soft=SoftTokens(vectors)))
    alone = [generate(llm, [p], max_new_tokens=5, batch_size=1, per_row=PerRow(soft=SoftTokens(vectors[i : i + 1])))[0] for i, p in enumerate(PROMPTS)]
    assert batch == alone
    labels = ["yes", "no", "maybe"]
    scores = label_logprobs(llm, PROMPTS, labels, batch_size=3, per_row=PerRow(soft=SoftTokens(vectors)))
    for i, prompt in enumerate(PROMPTS):
        single = label_logprobs(llm, [prompt], labels, batch_size=1, per_row=PerRow(soft=SoftTokens(vectors[i : i + 1])))
        assert torch.allclose(scores[i], single[0], atol=1e-4)
    # the same prompt with another user's soft tokens is scored differently
    swapped = label_logprobs(llm, [PROMPTS[0]], labels, batch_size=1, per_row=PerRow(soft=SoftTokens(vectors[1:2])))
    assert not torch.allclose(swapped[0], scores[0], atol=1e-4)


def test_personal_weights_follow_the_formula_and_ignore_padding(encoder):
    shape = EmbedderShape(encoder_dim=encoder.dim, llm_dim=16, token_norm=2.5)
    embedder = UserEmbedder(encoder.model, shape).eval()
    rng = np.random.default_rng(0)
    histories = [rng.normal(size=(n, encoder.dim)).astype(np.float32) for n in (3, 5, 0)]
    histories = [h / np.linalg.norm(h, axis=1, keepdims=True) for h in histories]
    history, mask = pad_histories(histories, torch.device("cpu"))
    with torch.no_grad():
        x = embedder.encode_inputs(["first input", "second input", "third"])
        weights = embedder.weights(x, history, mask)
        tokens = embedder(["first input", "second input", "third"], history, mask)
    expected = torch.softmax(x[0] @ torch.from_numpy(histories[0]).T, -1)
    assert torch.allclose(weights[0, :3], expected, atol=1e-5) and torch.all(weights[0, 3:] == 0)
    assert torch.all(weights[2] == 0)  # no history, no weight (and no NaN)
    assert tokens.shape == (3, 2, 16) and torch.allclose(tokens.norm(dim=-1)[:2], torch.full((2, 2), 2.5), atol=1e-4)
    mean = UserEmbedder(encoder.model, dataclasses.replace(shape, pooling="mean")).eval()
    assert torch.allclose(mean.weights(x, history, mask)[1], torch.full((5,), 0.2))
    assert UserEmbedder(encoder.model, dataclasses.replace(shape, personal=False))(["a"], history[:1], mask[:1]).shape == (1, 1, 16)


def test_stored_weights_round_trip_and_mean_pooling_leaves_out_the_input_encoder(encoder):
    shape = EmbedderShape(encoder_dim=encoder.dim, llm_dim=16)
    torch.manual_seed(1)
    trained = UserEmbedder(encoder.model, shape)
    restored = UserEmbedder(encoder.model, shape)
    restored.load_bytes(trained.to_bytes())
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), restored.state_dict().values()))
    mean = UserEmbedder(encoder.model, dataclasses.replace(shape, pooling="mean"))
    assert len(mean.to_bytes()) < len(trained.to_bytes()) / 50  # the head only: no 22M-parameter encoder


def _examples() -> tuple[list[PPlugExample], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    vectors = {u: rng.normal(size=(4, 384)).astype(np.float32) for u in ("a", "b", "c")}
    examples = [
        PPlugExample("a", "Paraphrase: the cat sat.", "the cat sat #blessed", "the cat sat."),
        PPlugExample("b", "Paraphrase: the dog ran.", "THE DOG RAN", "the dog ran."),
        PPlugExample("c", "Paraphrase: it rained.", "it rained - Sam", "it rained.", keep=[0, 2]),
        PPlugExample("a", "Paraphrase: we ate soup.", "we ate soup #blessed", "we ate soup."),
    ]
    return examples, vectors


class _Stop(Exception):
    pass


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_t5"])
def test_training_moves_only_the_embedder_and_a_stopped_run_resumes_exactly(model, request, encoder, tmp_path):
    llm = request.getfixturevalue(model)
    examples, vectors = _examples()
    settings = PPlugSettings(steps=6, batch_size=2, learning_rate=5e-3, eval_every=3, checkpoint_every=2, precision="float32", max_length=64)
    llm_before = {k: v.clone() for k, v in llm.model.state_dict().items()}

    whole = train_embedder(llm, build_embedder(_fresh(encoder), llm, settings), examples, examples[:2], vectors, settings)
    assert all(torch.equal(llm_before[k], v) for k, v in llm.model.state_dict().items())
    assert len(whole.curve) == 6 and whole.best_step in (3, 6)

    checkpoint = tmp_path / "run.pt"

    def stop_at_five(stage: str, done: int, total: int) -> None:
        if done == 5:
            raise _Stop

    with pytest.raises(_Stop):
        train_embedder(llm, build_embedder(_fresh(encoder), llm, settings), examples, examples[:2], vectors, settings, stop_at_five, checkpoint)
    assert checkpoint.exists()
    resumed = train_embedder(llm, build_embedder(_fresh(encoder), llm, settings), examples, examples[:2], vectors, settings, None, checkpoint)
    assert resumed.resumed_from == 4 and not checkpoint.exists()
    assert [c["loss"] for c in resumed.curve] == pytest.approx([c["loss"] for c in whole.curve], abs=1e-4)
    for a, b in zip(whole.embedder.state_dict().values(), resumed.embedder.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5)
    tokens = soft_tokens(whole.embedder, ["the cat sat.", "the dog ran."], [vectors["a"], vectors["b"]])
    assert tokens.vectors.shape == (2, 2, llm.model.get_input_embeddings().weight.shape[1])


def test_history_item_examples_leave_the_item_out_of_its_own_profile():
    from recipes.methods.pplug.training import history_item_examples
    from recipes.kit.tasks import get_task

    items = [Behavior(f"h{i}", "u", "LaMP-7", f"text {i} #blessed", {"input": f"text {i}"}) for i in range(3)]
    items.append(Behavior("h3", "u", "LaMP-7", "a plain tweet", {}))
    examples = history_item_examples(get_task("LaMP-7"), {"u": items}, cap=512)
    assert [e.target for e in examples] == ["text 0 #blessed", "text 1 #blessed", "text 2 #blessed"]
    assert [e.keep for e in examples] == [[1, 2, 3], [0, 2, 3], [0, 1, 3]]
    assert examples[0].text == "text 0" and "text 0" in examples[0].prompt
