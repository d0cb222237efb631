"""Per-Pcs mechanics on tiny random models and a real store: gates, the exact mix formula, layer-by-layer
assembly, the compact stored choice, versioned pool tags, and sharer selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipes import PersonaError
from recipes.kit.lora import LoraWeights, merge_into
from recipes.methods.peft_retrieval import retrieval_choices
from recipes.methods.perpcs import assembly
from recipes.methods.perpcs.assembly import _Assembler, assemble_user
from recipes.methods.perpcs.gates import GateSettings, gated_lora, mean_gates, train_gates
from recipes.kit.training_loop import Example
from recipes.methods.perpcs.pool import Pool, decode_choices, encode_choices, mixed_lora, piece_tensors, pool_from_pieces
from recipes.methods.perpcs.sharers import select_sharers
from store import Behavior, Piece, PoolVersion, Store
from test_lora import EXAMPLES, _copy, _random_lora

SHARERS = ["7", "12", "30"]


def _pool(llm, gates: dict[str, torch.Tensor] | None = None, every: int = 1) -> Pool:
    """A pool of three sharers with random LoRAs on q/v of a tiny model (gates random unless given)."""
    pieces = []
    for n, sharer in enumerate(SHARERS):
        lora = _random_lora(llm, seed=10 + n, rank=2 + n, scale=1.5, every=every)
        generator = torch.Generator().manual_seed(100 + n)
        for path, (a, b) in lora.modules.items():
            gate = gates[sharer] if gates else torch.randn(a.shape[1], generator=generator)
            pieces.append(
                Piece(task="LaMP-7", sharer_id=sharer, module=path, r=a.shape[0], alpha=1.5 * a.shape[0], llm=llm.id,
                      tensors=piece_tensors(a, b, gate), registration=1)  # fmt: skip
            )
    return pool_from_pieces("LaMP-7", PoolVersion(version=3, tags=["pool-1"]), pieces)


def test_gates_start_half_open_train_only_the_gates_and_leave_no_hooks(tiny_llama):
    llm = _copy(tiny_llama)
    lora = _random_lora(llm, seed=1, rank=2, scale=1.0)
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    trained = train_gates(llm, lora, EXAMPLES, GateSettings(steps=8, learning_rate=0.05, batch_size=2, precision="float32"))
    assert set(trained.gates) == set(lora.modules) and len(trained.curve) == 8
    assert any(g.abs().sum() > 0 for g in trained.gates.values())  # zero-initialized, then learned
    assert all(torch.equal(before[k], v) for k, v in llm.model.state_dict().items())
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = llm.model(ids).logits
    # with gates at zero the piece adds exactly half of its LoRA update (sigmoid(0) = 1/2)
    zero = {path: torch.zeros(a.shape[1]) for path, (a, _) in lora.modules.items()}
    with gated_lora(llm.model, lora, zero):
        gated = llm.model(ids).logits
    half = LoraWeights(lora.modules, {p: s / 2 for p, s in lora.scales.items()})
    merge_into(llm.model, half)
    assert torch.allclose(gated, llm.model(ids).logits, atol=1e-5)
    assert not torch.allclose(gated, plain)
    assert not llm.model.model.layers[0].self_attn.q_proj._forward_hooks  # hooks removed


def test_the_mix_is_the_exact_sum_of_weighted_products_not_averaged_a_and_b(tiny_llama):
    pool = _pool(tiny_llama)
    path = pool.module_order[0]
    choices = {path: [("30", 0.5), ("7", 0.3), ("12", 0.2)]}
    mixed = mixed_lora(pool, choices)
    a, b = mixed.modules[path]
    assert a.shape[0] == 3 * 4  # ranks 2, 3 and 4, each zero-padded to 4, concatenated
    module = pool.modules[path]
    expected = sum(w * module.b[module.sharers.index(s)] @ module.a[module.sharers.index(s)] for s, w in choices[path])
    assert torch.allclose(mixed.delta(path), expected, atol=1e-6)
    averaged = (sum(module.b[i] for i in range(3)) / 3) @ (sum(module.a[i] for i in range(3)) / 3)
    assert not torch.allclose(mixed.delta(path), averaged, atol=1e-3)


WRITERS = {  # three sharers who write differently
    "7": [Example("Paraphrase: the cat sat", "THE CAT SAT ON THE MAT!!!"), Example("Paraphrase: we went out", "WE WENT TO THE BEACH!!!")],
    "12": [Example("Paraphrase: the cat sat", "the cat sat down #cats #home"), Example("Paraphrase: we went out", "we went out #beach #sun")],
    "30": [Example("Paraphrase: the cat sat", "The cat, it seems, sat. - Sam"), Example("Paraphrase: we went out", "We went out at last. - Sam")],
}


def test_mean_gates_are_the_mean_input_direction_of_the_answers_and_pick_their_own_writer(tiny_llama):
    """`--gates mean`: each gate is its module's mean input direction over the sharer's answer
    tokens, read as assembly reads a history (no training); scored less the pool's mean gate, a
    target who writes like one sharer gets that sharer's piece in every module."""
    llm = _copy(tiny_llama)
    settings = GateSettings(batch_size=4, max_length=64, precision="float32", kind="mean")
    paths = sorted(_random_lora(llm, seed=1, rank=2).modules)
    gates = {sharer: mean_gates(llm, paths, examples, settings).gates for sharer, examples in WRITERS.items()}
    # the same mean, one example at a time and unpacked
    path, seen = paths[0], []
    for example in WRITERS["12"]:
        batch = assembly.assembly_batch(llm, [example], 64, pack=False)
        [mask] = assembly.scored_positions(llm, batch).values()
        handle = llm.model.get_submodule(path).register_forward_pre_hook(lambda module, args: seen.append(args[0][mask]))
        with torch.no_grad():
            llm.model(**{k: v for k, v in batch.items() if k != "labels"})
        handle.remove()
    expected = torch.nn.functional.normalize(torch.cat(seen).float(), dim=-1).mean(0)
    assert torch.allclose(gates["12"][path], expected, atol=1e-5)

    pieces = []
    for n, sharer in enumerate(WRITERS):
        lora = _random_lora(llm, seed=20 + n, rank=2)
        for module, (a, b) in lora.modules.items():
            pieces.append(Piece(task="LaMP-7", sharer_id=sharer, module=module, r=2, alpha=2.0, llm=llm.id, registration=1,
                                tensors=piece_tensors(a, torch.zeros_like(b), gates[sharer][module]), config={"gates": {"kind": "mean"}}))  # fmt: skip
    pool = pool_from_pieces("LaMP-7", PoolVersion(version=3, tags=["pool-1"]), pieces)
    assert pool.gate_kind == "mean"
    for sharer, examples in WRITERS.items():
        chosen = assemble_user(llm, pool, examples, top_k=1, batch_size=4, max_length=64, precision="float32")
        assert {picked[0][0] for picked in chosen.values()} == {sharer}

    mixed = pieces + [Piece(task="LaMP-7", sharer_id="40", module=paths[0], r=2, alpha=2.0, llm=llm.id, registration=2,
                            tensors=pieces[0].tensors, config={"gates": {"kind": "trained"}})]  # fmt: skip
    with pytest.raises(PersonaError, match="mixes LaMP-7 pieces with mean and trained gates"):
        pool_from_pieces("LaMP-7", PoolVersion(version=4, tags=["pool-2"]), mixed)


def _mean_input_direction(llm) -> torch.Tensor:
    """The mean direction of layer 0's attention inputs over the examples' tokens."""
    seen = []
    norm = llm.model.model.layers[0].input_layernorm
    handle = norm.register_forward_hook(lambda module, args, output: seen.append(output.detach()))
    try:
        with torch.no_grad():
            for example in EXAMPLES:
                llm.model(llm.tokenizer((example.prompt or "") + " " + example.target, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    units = torch.nn.functional.normalize(torch.cat([x.reshape(-1, x.shape[-1]) for x in seen]), dim=-1)
    return units.mean(dim=0)


def test_assembly_follows_the_gates_and_is_deterministic(tiny_llama):
    hidden = tiny_llama.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    # sharer 12's gate points along the mean direction of the layer's inputs, 7's against it, 30's anywhere
    along = _mean_input_direction(tiny_llama)
    gates = {"7": -along, "12": along, "30": torch.randn(hidden, generator=generator)}
    pool = _pool(tiny_llama, gates)
    first = assemble_user(tiny_llama, pool, EXAMPLES, top_k=1, batch_size=2)
    second = assemble_user(tiny_llama, pool, EXAMPLES, top_k=1, batch_size=2)
    assert first == second
    layer0 = [path for path in pool.module_order if ".layers.0." in path]  # inputs no earlier piece has changed
    assert layer0 and all(first[path][0][0] == "12" for path in layer0), first
    assert all(abs(sum(w for _, w in picked) - 1) < 1e-6 for picked in first.values())
    wide = assemble_user(tiny_llama, pool, EXAMPLES, top_k=3, batch_size=2)
    assert all(len(picked) == 3 for picked in wide.values())
    assert all([s for s, _ in wide[path]][0] == "12" and [s for s, _ in wide[path]][-1] == "7" for path in layer0), wide
    # softmax(score / sqrt(n)) of mean cosines in [-1, 1]: the weights stay within a narrow band
    n = hidden
    assert all(max(w for _, w in p) / min(w for _, w in p) <= math.exp(2 / math.sqrt(n)) + 1e-6 for p in wide.values())


def test_assembly_scores_each_module_on_inputs_the_earlier_pieces_already_changed(tiny_llama):
    pool = _pool(tiny_llama)
    assembler = _Assembler(pool, top_k=2, device=torch.device("cpu"))
    last = tiny_llama.model.get_submodule(pool.module_order[-1])  # layer 1, after the pieces of layer 0
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assembler.masks = {5: torch.ones(1, 5, dtype=torch.bool)}

    def input_of_last(hooked: bool) -> torch.Tensor:
        seen = []
        handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        try:
            with torch.no_grad():
                if hooked:
                    with assembler.hooked(tiny_llama.model):
                        tiny_llama.model(ids)
                else:
                    tiny_llama.model(ids)
        finally:
            handle.remove()
        return seen[0]

    assert not torch.allclose(input_of_last(True), input_of_last(False))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_assembly_reads_batched_examples_whole_as_each_alone(tiny_llama, monkeypatch, attention):
    """Examples batched together share the chat turn and the task's instruction, which assembly
    packs once per sequence; every scored token must still see what it sees alone (a shared prefix
    left out of the forward pass shifts every later layer's inputs: assembly ran that way,
    unnoticed, from 2026-12-03 to 12-07)."""
    llm = _copy(tiny_llama)
    llm.model.config._attn_implementation = attention
    pool = _pool(llm)
    for module in pool.modules.values():
        module.b.zero_()  # pieces that add nothing: every batching sees the plain model's inputs
    last = llm.model.get_submodule(pool.module_order[-1])  # layer 1: its inputs depend on the context
    masks = []
    original = assembly.scored_positions
    monkeypatch.setattr(assembly, "scored_positions", lambda *args: masks.append(original(*args)) or masks[-1])

    def scored_inputs(batch_size: int, examples: list[Example]) -> torch.Tensor:
        seen = []
        handle = last.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
        masks.clear()
        try:
            assemble_user(llm, pool, examples, top_k=1, batch_size=batch_size, precision="float32")
        finally:
            handle.remove()
        return torch.cat([x[mask[x.shape[1]]] for x, mask in zip(seen, masks)])

    examples = EXAMPLES[:3] + [Example("Paraphrase: " + text, text.upper()) for text in ("snow fell all night", "the bus was late")]
    packed = []
    pack = assembly.packed_causal_batch
    monkeypatch.setattr(assembly, "packed_causal_batch", lambda *args: packed.append(pack(*args)) or packed[-1])
    alone = scored_inputs(1, examples)
    assert packed == [None] * 5  # one row alone: nothing to share
    together = scored_inputs(5, examples)
    assert packed[-1]["input_ids"].shape[0] == 2  # packed: four rows behind one prefix, then one
    assert alone.shape == together.shape and alone.shape[0] > 5 * 3
    assert torch.allclose(alone, together, atol=1e-5), (alone - together).abs().max()


def test_the_stored_choice_is_indices_and_weights_only(tiny_llama):
    pool = _pool(tiny_llama)
    choices = {path: [("12", 0.6), ("7", 0.4)] for path in pool.module_order}
    data = encode_choices(pool, choices, top_k=3)
    back = decode_choices(pool, data)
    assert {p: [(s, round(w, 6)) for s, w in c] for p, c in back.items()} == choices
    # 120 modules (SmolLM2's q/k/v/o in 30 layers) with k=3: int16 ids + float32 weights + header
    big = Pool("LaMP-7", 1, ["pool-1"], "x", None, [str(i) for i in range(50)], {f"m{i}": pool.modules[pool.module_order[0]] for i in range(120)})
    size = len(encode_choices(big, {}, top_k=3))
    assert size < 2400


def test_peft_retrieval_mixes_whole_adapters_of_the_closest_sharers(tiny_llama):
    pool = _pool(tiny_llama)
    embeddings = {"7": np.array([1.0, 0.0]), "12": np.array([0.0, 1.0]), "30": np.array([0.7, 0.7])}
    choices = retrieval_choices(pool, np.array([1.0, 0.1]), embeddings, top_k=2)
    assert set(choices) == set(pool.modules)
    picked = next(iter(choices.values()))
    assert [s for s, _ in picked] == ["7", "30"] and picked[0][1] > picked[1][1]
    assert abs(sum(w for _, w in picked) - 1) < 1e-6


def test_seq2seq_assembly_runs_on_a_tiny_t5(tiny_t5):
    pool = _pool(tiny_t5)
    examples = [Example("short", "a b c d e f g h"), Example("a longer input than the output", "x")]
    choices = assemble_user(tiny_t5, pool, examples, top_k=2, batch_size=2)
    assert set(choices) == set(pool.modules) and all(len(p) == 2 for p in choices.values())
    equal = [Example("one two", "one two")]  # encoder and decoder of the same length
    assert assemble_user(tiny_t5, pool, equal, top_k=1)


def _items(user: str, n: int, vector: list[float]) -> list[Behavior]:
    v = np.asarray(vector, dtype=np.float32)
    return [Behavior(f"{user}-{i}", user, "LaMP-7", "text", vector=v / np.linalg.norm(v)) for i in range(n)]


def test_sharer_selection_strategies():
    histories = {
        "1": _items("1", 12, [1, 0]), "2": _items("2", 20, [1, 0.1]), "3": _items("3", 5, [1, 0.05]),
        "4": _items("4", 15, [0, 1]), "5": _items("5", 11, [0.1, 1]), "6": _items("6", 30, [-1, 0]),
    }  # fmt: skip
    # three clusters (x, y, -x): the most active member of each with at least 10 items
    assert select_sharers(histories, "history-cluster", 3, min_history=10) == ["2", "4", "6"]
    assert select_sharers(histories, "most-active", 2) == ["2", "6"]
    drawn = select_sharers(histories, "random", 3, seed=1)
    assert len(drawn) == 3 and "3" not in drawn and drawn == select_sharers(histories, "random", 3, seed=1)
    with pytest.raises(PersonaError, match="at least 50 history items"):
        select_sharers(histories, "most-active", 2, min_history=50)
    with pytest.raises(PersonaError, match="--strategy"):
        select_sharers(histories, "loudest", 2)


def test_pool_versions_are_tagged_and_stay_readable_after_the_pool_grows(tmp_path, tiny_llama):
    store = Store(tmp_path / "store")
    pool = _pool(tiny_llama)

    def pieces(sharer: str, registration: int) -> list[Piece]:
        module = pool.modules[pool.module_order[0]]
        i = module.sharers.index(sharer)
        tensors = piece_tensors(module.a[i], module.b[i], module.gates[i])
        return [Piece("LaMP-7", sharer, path, 4, 4.0, "tiny", tensors, registration) for path in pool.module_order]

    first = store.add_pool_version(pieces("7", 1) + pieces("12", 1), ["pool-1"])
    second = store.add_pool_version(pieces("30", 2) + pieces("12", 2), ["pool-2", "paper"])
    assert [v.tags for v in store.pool_versions()] == [["pool-1"], ["paper", "pool-2"]]
    assert store.resolve_pool().version == second.version and store.resolve_pool("paper").version == second.version
    old = {p.sharer_id for p in store.pool_pieces(first.version)}
    assert store.resolve_pool("paper").version == second.version  # reading an old version moves no other read back
    new = {(p.sharer_id, p.registration) for p in store.pool_pieces(second.version)}
    assert old == {"7", "12"} and new >= {("7", 1), ("12", 2), ("30", 2)}
    assert len(store.pool_pieces(second.version)) == 3 * len(pool.module_order)  # 12 replaced, not duplicated
    with pytest.raises(PersonaError, match="exists"):
        store.tag_pool(first.version, "paper")
    store.tag_pool(first.version, "baseline")
    assert store.resolve_pool("baseline").version == first.version
    from recipes.methods.perpcs.pool import pool_diff

    diff = pool_diff(store, "pool-1", "pool-2")
    assert diff["sharers_added"] == ["LaMP-7/30"] and diff["sharers_retrained"] == ["LaMP-7/12"]
    assert diff["pieces_added"] == len(pool.module_order) and diff["pieces_removed"] == 0
    # pruning old versions keeps the tagged ones: assemblies name them
    assert store.optimize(prune_versions=True)["versions_kept"] == ["pieces"]
    assert {p.sharer_id for p in store.pool_pieces(store.resolve_pool("pool-1").version)} == {"7", "12"}
    with pytest.raises(PersonaError, match="tag 'bad tag'"):
        store.tag_pool(first.version, "bad tag")
    # a registration that fails after tagging its version leaves neither pieces nor tag behind
    with pytest.raises(RuntimeError), store.transaction():
        store.add_pool_version(pieces("7", 3), ["pool-3"])
        raise RuntimeError("the command fails after the pool write")
    assert "pool-3" not in store.pool_tags() and {p.registration for p in store.pool_pieces(store.resolve_pool().version) if p.sharer_id == "7"} == {1}


def test_methods_combine_a_per_user_adapter_with_a_prompt_method():
    from recipes.methods.registry import parse_method

    names = lambda method: tuple(m.name if m else None for m in parse_method(method))  # noqa: E731
    assert names("perpcs") == ("perpcs", "none")
    assert names("perpcs+rag") == ("perpcs", "rag")
    assert names("oppu+pag") == ("oppu", "pag")
    assert names("rag") == (None, "rag")
    for bad in ("task-lora+rag", "rag+perpcs", "perpcs+", "perpcs+perpcs"):
        with pytest.raises(PersonaError, match="--method"):
            parse_method(bad)
