"""LoRA mechanics on tiny random models: target discovery, seeded and resumable training, weights
as bytes, merging, per-row adapters in one batch, and peft folders that peft itself loads."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
from peft import PeftModel

from recipes import PersonaError
from recipes.kit.lora import LoraWeights, combine, export_peft, find_target_modules, merge_into, read_peft_folder
from recipes.kit.backbones import prepare_llm
from recipes.kit.decoding import GREEDY, Decoding
from recipes.kit.generation import generate, label_logprobs, prompt_token_ids
from recipes.kit.training_loop import Example, LoraSettings, autocast_for, autocast_weights, batch_order, train_lora
from recipes.kit.row_edits import PerRow
from recipes.kit.row_lora import RowLora

EXAMPLES = [
    Example("Paraphrase: the cat sat on the mat", "THE CAT SAT ON THE MAT"),
    Example("Paraphrase: we went to the beach", "WE WENT TO THE BEACH"),
    Example("Paraphrase: rain is coming today", "RAIN IS COMING TODAY"),
    Example(None, "a history item trained as plain language modelling"),
]
PROMPTS = ["Paraphrase: the dog ran", "Paraphrase: a much longer input sentence about many things", "hello", "x y z"]


def _copy(llm):
    """A private copy of a session fixture, for tests that change weights."""
    return prepare_llm(llm.id, copy.deepcopy(llm.model), llm.tokenizer, llm.device)


def _settings(**overrides) -> LoraSettings:
    base = dict(r=4, alpha=8, learning_rate=5e-2, batch_size=2, steps=6, precision="float32", seed=3)
    return LoraSettings(**{**base, **overrides})


def _random_lora(llm, seed: int, rank: int = 4, scale: float = 2.0, every: int = 1) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in llm.model.named_modules():
        if path.endswith(("q_proj", "v_proj", ".q", ".v")) and isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            modules[path] = (torch.randn(rank, in_f, generator=generator) * 0.3, torch.randn(out_f, rank, generator=generator) * 0.3)
    modules = dict(list(modules.items())[::every])
    return LoraWeights(modules, {p: scale for p in modules})


def test_attention_projections_are_found_from_the_architecture(tiny_llama, tiny_t5):
    assert find_target_modules(tiny_llama.model) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert find_target_modules(tiny_t5.model) == ["k", "o", "q", "v"]


def test_training_lowers_the_loss_is_seeded_and_leaves_the_llm_unchanged(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.model.state_dict().items()}
    first = train_lora(tiny_llama, EXAMPLES, _settings(steps=12))
    second = train_lora(tiny_llama, EXAMPLES, _settings(steps=12))
    losses = [point["loss"] for point in first.curve]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert first.weights.modules.keys() == second.weights.modules.keys()
    for path, (a, b) in first.weights.modules.items():
        assert torch.equal(a, second.weights.modules[path][0]) and torch.equal(b, second.weights.modules[path][1])
    after = tiny_llama.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert first.weights.scales == {p: 2.0 for p in first.weights.modules}  # alpha / r


def test_an_interrupted_training_resumes_from_its_checkpoint_and_ends_the_same(tiny_llama, tmp_path):
    settings = _settings(steps=6, checkpoint_every=2, dropout=0.1)
    whole = train_lora(tiny_llama, EXAMPLES, settings)
    checkpoint = tmp_path / "run.pt"

    def stop_at_five(stage, done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_lora(tiny_llama, EXAMPLES, settings, progress=stop_at_five, checkpoint=checkpoint)
    assert checkpoint.exists()
    # another base under the adapter, or other dev examples, must not resume this run: said, not silent
    merged_base = dataclasses.replace(tiny_llama, merged=("another base",))  # as apply_chain records a merge
    for llm, other in ((merged_base, {}), (tiny_llama, {"dev": EXAMPLES[:2]})):
        shutil.copy(checkpoint, tmp_path / "other.pt")
        started_over = train_lora(llm, EXAMPLES, settings, checkpoint=tmp_path / "other.pt", **other)
        assert started_over.resumed_from is None and "training started over" in started_over.ignored_checkpoint
    resumed = train_lora(tiny_llama, EXAMPLES, settings, checkpoint=checkpoint)
    assert resumed.resumed_from == 4 and resumed.ignored_checkpoint is None
    assert not checkpoint.exists(), "a finished run removes its checkpoint"
    for path, (a, b) in whole.weights.modules.items():
        torch.testing.assert_close(resumed.weights.modules[path][0], a)
        torch.testing.assert_close(resumed.weights.modules[path][1], b)
    assert [p["loss"] for p in resumed.curve] == pytest.approx([p["loss"] for p in whole.curve])


def test_dev_loss_picks_the_best_step(tiny_llama):
    trained = train_lora(tiny_llama, EXAMPLES, _settings(steps=6, eval_every=2), dev=EXAMPLES[:2])
    dev_points = [p for p in trained.curve if "dev_loss" in p]
    assert [p["step"] for p in dev_points] == [2, 4, 6]
    best = min(dev_points, key=lambda p: p["dev_loss"])
    assert trained.best_step == best["step"] and trained.best_dev_loss == best["dev_loss"]


def test_weights_cast_once_for_autocast_answer_exactly_as_autocast_and_come_back(tiny_llama):
    batch = tiny_llama.tokenizer(["a short prompt", "another prompt, a little longer"], return_tensors="pt", padding=True)
    q_proj = tiny_llama.model.model.layers[0].self_attn.q_proj
    with torch.inference_mode():
        with autocast_for(tiny_llama, "bfloat16"):
            expected = tiny_llama.model(**batch).logits
        with autocast_weights(tiny_llama, "bfloat16"):
            assert q_proj.weight.dtype == torch.bfloat16
            got = tiny_llama.model(**batch).logits
    assert expected.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert {p.dtype for p in tiny_llama.model.parameters()} == {torch.float32}


def test_batches_cover_every_example_before_repeating():
    order = batch_order(5, steps=5, batch_size=2, seed=1)
    assert order == batch_order(5, steps=5, batch_size=2, seed=1)
    assert sorted(order[0] + order[1] + [order[2][0]]) == [0, 1, 2, 3, 4]


def test_weights_survive_bytes_and_combining_adds_the_updates(tiny_llama):
    first, second = _random_lora(tiny_llama, 1), _random_lora(tiny_llama, 2, rank=2, scale=0.5, every=2)
    again = LoraWeights.from_bytes(first.to_bytes())
    assert again.scales == first.scales
    for path in first.modules:
        torch.testing.assert_close(again.delta(path), first.delta(path))
    both = combine([first, second])
    for path in first.modules:
        expected = first.delta(path) + (second.delta(path) if path in second.modules else 0)
        torch.testing.assert_close(both.delta(path), expected, atol=1e-5, rtol=1e-5)
    assert max(both.ranks.values()) == 6 and min(both.ranks.values()) == 4


@pytest.mark.parametrize("decoding", [GREEDY, Decoding(num_beams=3, no_repeat_ngram_size=2)], ids=["greedy", "beams"])
def test_rows_with_different_adapters_in_one_batch_answer_as_their_merged_models(tiny_llama, decoding):
    adapters = [_random_lora(tiny_llama, 1), None, _random_lora(tiny_llama, 2, rank=2), _random_lora(tiny_llama, 1)]
    alone = []
    for prompt, adapter in zip(PROMPTS, adapters):
        merged = _copy(tiny_llama)
        if adapter is not None:
            merge_into(merged.model, adapter)
        alone.append(generate(merged, [prompt], max_new_tokens=8, batch_size=1, decoding=decoding)[0])
    assert len(set(alone)) > 1
    together = generate(tiny_llama, PROMPTS, max_new_tokens=8, batch_size=3, per_row=PerRow(RowLora(tiny_llama.model, adapters)), decoding=decoding)
    assert together == alone


@pytest.mark.parametrize("crossover", [0, 100], ids=["pool-once", "per-row"])
@pytest.mark.parametrize("decoding", [GREEDY, Decoding(num_beams=3, no_repeat_ngram_size=2)], ids=["greedy", "beams"])
def test_rows_mixing_shared_pieces_answer_as_their_mixed_adapters_merged(tiny_llama, decoding, crossover, monkeypatch):
    """Per-Pcs serving: every row a different weighting of one pool's pieces, applied through the
    pool once per batch or through each row's own pieces (whichever is faster for the batch)."""
    from recipes.kit import pool_rows
    from recipes.kit.lora import mix_pieces
    from recipes.kit.pool_rows import PoolRows

    monkeypatch.setattr(pool_rows, "CROSSOVER", crossover)

    sharers = [_random_lora(tiny_llama, seed, rank=2, every=1 + seed % 2) for seed in range(1, 5)]
    pieces = {}
    for path in sharers[0].modules:
        a = torch.stack([s.modules[path][0] if path in s.modules else torch.zeros_like(sharers[0].modules[path][0]) for s in sharers])
        b = torch.stack([s.modules[path][1] * s.scales[path] if path in s.modules else torch.zeros_like(sharers[0].modules[path][1]) for s in sharers])
        pieces[path] = (a, b)
    paths = sorted(pieces)
    picks = [{p: torch.tensor([0.7, 0.3, 0.0, 0.0]) for p in paths}, {}, {p: torch.tensor([0.0, 0.0, 0.5, 0.5]) for p in paths[::2]}, {p: torch.full((4,), 0.25) for p in paths}]
    alone = []
    for prompt, mix in zip(PROMPTS, picks):
        merged = _copy(tiny_llama)
        if mix:
            modules = {p: mix_pieces(pieces[p][0], pieces[p][1], w) for p, w in mix.items()}
            merge_into(merged.model, LoraWeights(modules, {p: 1.0 for p in modules}))
        alone.append(generate(merged, [prompt], max_new_tokens=8, batch_size=1, decoding=decoding)[0])
    assert len(set(alone)) > 1
    rows = PoolRows(tiny_llama.model, pieces, picks)
    assert generate(tiny_llama, PROMPTS, max_new_tokens=8, batch_size=3, per_row=PerRow(rows), decoding=decoding) == alone
    one_user = PoolRows(tiny_llama.model, pieces, [picks[0]])  # reads only the pieces that user weights: 2 of 4, rank 2 each
    assert one_user.a[paths[0]].shape[0] == 2 * 2
    assert generate(tiny_llama, PROMPTS[:1], max_new_tokens=8, batch_size=1, per_row=PerRow(one_user), decoding=decoding) == alone[:1]


def test_label_scores_with_per_row_adapters_match_merged_models(tiny_llama, tiny_t5):
    for llm in (tiny_llama, tiny_t5):
        adapters = [_random_lora(llm, 1), _random_lora(llm, 2)]
        together = label_logprobs(llm, PROMPTS[:2], ["yes", "no way"], per_row=PerRow(RowLora(llm.model, adapters)))
        for row, adapter in enumerate(adapters):
            merged = _copy(llm)
            merge_into(merged.model, adapter)
            torch.testing.assert_close(together[row], label_logprobs(merged, [PROMPTS[row]], ["yes", "no way"])[0], atol=1e-4, rtol=1e-4)


def test_seq2seq_models_train_and_serve_per_row_adapters(tiny_t5):
    trained = train_lora(tiny_t5, EXAMPLES, _settings(steps=4))
    assert set(trained.target_modules) == {"q", "k", "v", "o"}
    merged = _copy(tiny_t5)
    merge_into(merged.model, trained.weights)
    alone = generate(merged, PROMPTS[:2], max_new_tokens=6, batch_size=2)
    assert generate(tiny_t5, PROMPTS[:2], max_new_tokens=6, batch_size=2, per_row=PerRow(RowLora(tiny_t5.model, [trained.weights] * 2))) == alone


def test_an_exported_folder_loads_in_plain_peft_with_the_same_outputs(tiny_llama, tmp_path):
    """A chain (base + adapter of another rank on fewer modules) exports as one peft adapter."""
    chain = combine([_random_lora(tiny_llama, 1), _random_lora(tiny_llama, 2, rank=2, scale=0.5, every=2)])
    folder = export_peft(chain, "tiny-llama", tmp_path / "adapter")
    assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama.model), str(folder)).eval()
    merged = _copy(tiny_llama)
    merge_into(merged.model, chain)
    ids = torch.tensor([prompt_token_ids(tiny_llama, PROMPTS[1])])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, merged.model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    imported, config = read_peft_folder(folder, copy.deepcopy(tiny_llama.model))
    assert config["r"] == 6
    for path in chain.modules:
        torch.testing.assert_close(imported.delta(path), chain.delta(path), atol=1e-5, rtol=1e-5)
    with pytest.raises(PersonaError, match="not empty"):
        export_peft(chain, "tiny-llama", folder)


def test_unknown_target_modules_are_a_clear_error(tiny_llama):
    with pytest.raises(PersonaError, match="no linear layer named 'qq_proj'"):
        train_lora(tiny_llama, EXAMPLES, _settings(target_modules=["qq_proj"]))


def test_history_trains_in_task_format_when_items_have_inputs_else_as_text():
    from recipes.kit.training_data import history_examples
    from recipes.kit.tasks import get_task
    from store import Behavior

    task = get_task("LaMP-7")
    styled = Behavior("a", "u", "LaMP-7", "the cat sat #blessed", {"input": "The cat sat.", "text": "the cat sat #blessed"})
    tweet = Behavior("b", "u", "LaMP-7", "just a tweet", {"text": "just a tweet"})
    task_format, plain = history_examples(task, [styled, tweet])
    assert task_format.prompt == "Paraphrase the following tweet without any explanation before or after it: The cat sat."
    assert task_format.target == "the cat sat #blessed"
    assert plain.prompt is None and plain.target == "just a tweet"
