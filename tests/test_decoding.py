"""Decoding options on tiny random models: the repetition controls look at the answer only (checked
against a plain full-recompute oracle), beam search answers a mixed batch as it answers each prompt
alone and as transformers does, token limits follow each input's length, and bad values fail in
one line."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from conftest import EXAMPLES, cli_fails
from persona_cli.main import app
from recipes import PersonaError
from recipes.flows.answer import answer_prompts
from recipes.kit.decoding import GREEDY, LENGTH_SLACK, Decoding
from recipes.kit.generation import generate, prompt_token_ids
from recipes.kit.row_edits import PerRow
from recipes.kit.soft_prompts import SoftTokens
from recipes.kit.tasks import get_task

PROMPTS = [
    "the cat sat on the mat and the cat sat on the mat",
    "a much longer prompt with many more tokens in it than the others have",
    "x",
    "repeat repeat repeat repeat",
]


def _oracle(llm, prompt: str, steps: int, penalty: float, ngram: int) -> str:
    """Greedy decoding by recomputing the whole sequence each step, with the penalty and the n-gram
    ban computed by hand from the answer's own tokens (never the prompt's)."""
    ids = prompt_token_ids(llm, prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = llm.model(torch.tensor([ids + out])).logits[0, -1].clone()
            for token in set(out):
                logits[token] = logits[token] * penalty if logits[token] < 0 else logits[token] / penalty
            if ngram and len(out) >= ngram - 1:
                tail = tuple(out[len(out) - ngram + 1 :])
                for i in range(len(out) - ngram + 1):
                    if tuple(out[i : i + ngram - 1]) == tail:
                        logits[out[i + ngram - 1]] = float("-inf")
            token = int(logits.argmax())
            if token == llm.tokenizer.eos_token_id:
                break
            out.append(token)
    return llm.tokenizer.decode(out, skip_special_tokens=True).strip()


def _has_repeated_ngram(llm, text: str, n: int) -> bool:
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.fixture(scope="module")
def looping(tiny_llama):
    """The tiny Llama with its output layer set to its input embeddings, on plain prompts (no chat
    template): it repeats the prompt's last token ("mat mat mat ...")."""
    model = copy.deepcopy(tiny_llama.model)
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone() * 4)
    tokenizer = copy.deepcopy(tiny_llama.tokenizer)
    tokenizer.chat_template = None
    return dataclasses.replace(tiny_llama, model=model, tokenizer=tokenizer)


def test_repetition_controls_count_the_answers_tokens_and_not_the_prompts(looping):
    plain = generate(looping, PROMPTS, max_new_tokens=16, batch_size=2)
    assert all(_has_repeated_ngram(looping, a, 2) for a in plain)
    for controlled in (Decoding(no_repeat_ngram_size=2), Decoding(repetition_penalty=1.5), Decoding(no_repeat_ngram_size=3, repetition_penalty=1.3)):
        ours = generate(looping, PROMPTS, max_new_tokens=16, batch_size=2, decoding=controlled)
        assert ours == [_oracle(looping, p, 16, controlled.repetition_penalty, controlled.no_repeat_ngram_size) for p in PROMPTS]
        assert ours != plain


def test_on_a_paraphrase_the_answer_may_reuse_the_inputs_words(llm):
    """transformers' stock no_repeat_ngram_size counts the prompt, so a paraphrase cannot reuse the
    input's word pairs; ours counts only the answer, so the real SmolLM2 still copies what it should."""
    prompt = "Paraphrase the following tweet without any explanation before or after it: I love the new coffee shop downtown, great coffee!"
    ours = generate(llm, [prompt], max_new_tokens=24, decoding=Decoding(no_repeat_ngram_size=2))[0]
    ids = torch.tensor([prompt_token_ids(llm, prompt)])
    stock = llm.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, no_repeat_ngram_size=2,
        pad_token_id=llm.tokenizer.pad_token_id,
    )  # fmt: skip
    stock_answer = llm.tokenizer.decode(stock[0, ids.shape[1] :], skip_special_tokens=True)
    assert "coffee shop" in ours.lower() and "coffee shop" not in stock_answer.lower()
    assert not _has_repeated_ngram(llm, ours, 2)


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_t5"])
def test_beam_search_answers_a_mixed_batch_as_each_prompt_alone(model, request):
    llm = request.getfixturevalue(model)
    torch.manual_seed(5)
    width = llm.model.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(len(PROMPTS), 2, width)
    beams = Decoding(num_beams=3)
    batch = generate(llm, PROMPTS, max_new_tokens=8, batch_size=3, per_row=PerRow(soft=SoftTokens(vectors)), decoding=beams)
    alone = [generate(llm, [p], max_new_tokens=8, batch_size=1, per_row=PerRow(soft=SoftTokens(vectors[i : i + 1])), decoding=beams)[0] for i, p in enumerate(PROMPTS)]
    assert batch == alone


def test_beam_search_is_transformers_beam_search(tiny_llama):
    for prompt in PROMPTS:
        ids = torch.tensor([prompt_token_ids(tiny_llama, prompt)])
        out = tiny_llama.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, num_beams=4,
            early_stopping=True, pad_token_id=tiny_llama.tokenizer.pad_token_id,
        )  # fmt: skip
        expected = tiny_llama.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        assert generate(tiny_llama, [prompt], max_new_tokens=10, decoding=Decoding(num_beams=4)) == [expected]


def test_a_length_ratio_limits_each_answer_by_its_own_inputs_length(tiny_llama):
    task = get_task("LaMP-7")
    ratio = Decoding(length_ratio=0.5)
    assert ratio.new_token_limit(64, 10) == 5 + LENGTH_SLACK and ratio.new_token_limit(6, 10) == 6
    assert GREEDY.new_token_limit(64, 1000) == 64
    inputs = [f"Paraphrase the following tweet without any explanation before or after it: {w}" for w in ("hi", "word " * 80)]
    answers = answer_prompts(tiny_llama, task, "generate", inputs, max_new_tokens=40, decoding=ratio, inputs=inputs)
    tokens = [len(tiny_llama.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    unlimited = answer_prompts(tiny_llama, task, "generate", inputs, max_new_tokens=40)
    assert answers[1] == unlimited[1]  # 80 input tokens allow 48 new ones: the 40 asked for
    assert tokens[0] <= 1 + LENGTH_SLACK + 1 and len(answers[0]) < len(unlimited[0])


def test_a_length_penalty_below_one_makes_beam_search_answer_shorter(llm):
    """Beam scores are log-probability / length^P: a lower P favours beams that finish early (real SmolLM2)."""
    task = get_task("LaMP-7")
    head = "Paraphrase the following tweet without any explanation before or after it: "
    inputs = [head + t for t in ("I'm walking to the bus stop and feeling quite anxious about the upcoming exam.",
                                 "Heading to bed with strong painkillers, excited for tomorrow and looking forward to it.")]  # fmt: skip
    lengths = {}
    for penalty in (-1.0, 1.0, 2.0):
        answers = answer_prompts(llm, task, "generate", inputs, max_new_tokens=40, decoding=Decoding(num_beams=4, length_penalty=penalty))
        lengths[penalty] = sum(len(a.split()) for a in answers)
    assert lengths[-1.0] < lengths[1.0] <= lengths[2.0]


def test_decoding_values_are_checked():
    for bad in (Decoding(num_beams=0), Decoding(no_repeat_ngram_size=-1), Decoding(repetition_penalty=0), Decoding(length_ratio=0),
                Decoding(length_penalty=0.5)):  # fmt: skip
        with pytest.raises(PersonaError):
            bad.validate()
    assert Decoding(num_beams=4).override(num_beams=None, repetition_penalty=1.2) == Decoding(num_beams=4, repetition_penalty=1.2)


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--beams", "0"], "--beams must be at least 1"), (["--repetition-penalty", "0"], "--repetition-penalty must be positive"),
     (["--length-ratio", "-1"], "--length-ratio must be positive"), (["--no-repeat-ngram", "-2"], "--no-repeat-ngram"),
     (["--length-penalty", "0.5"], "--length-penalty shapes beam search only")],
)  # fmt: skip
def test_bad_decoding_options_fail_in_one_line_before_any_model_loads(store_path, option, message):
    from typer.testing import CliRunner

    assert CliRunner().invoke(app, ["--store", str(store_path), "ingest", str(EXAMPLES), "--task", "LaMP-7"]).exit_code == 0
    assert message in cli_fails(store_path, "evaluate", "--task", "LaMP-7", "--llm", "/nonexistent", *option)
    assert message in cli_fails(store_path, "generate", "--user", "42", "--llm", "/nonexistent", *option, "Paraphrase: hi")
