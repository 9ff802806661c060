"""Real TRL trainers on CPU (tiny Llama, toy word-level tokenizer, tiny datasets built here): the
Liger-patched trainers log the same losses and metrics as stock TRL for several optimizer steps."""

import copy
import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from liger_plugins import trl as liger_trl  # noqa: E402

WORDS = [f"w{i}" for i in range(290)]
SPECIAL = ["<pad>", "<eos>", "<unk>"]


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return tok


def _sentence(gen, n):
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=gen).tolist())


@pytest.fixture(scope="module")
def preference_dataset():
    gen = torch.Generator().manual_seed(0)
    rows = [
        {
            "prompt": _sentence(gen, 3 + i % 4),
            "chosen": " " + _sentence(gen, 2 + i % 5),
            "rejected": " " + _sentence(gen, 1 + (i * 3) % 6),
        }
        for i in range(12)
    ]
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def unpaired_dataset():
    gen = torch.Generator().manual_seed(1)
    rows = [
        {"prompt": _sentence(gen, 2 + i % 3), "completion": " " + _sentence(gen, 2 + i % 4), "label": i % 3 != 1}
        for i in range(12)
    ]
    return datasets.Dataset.from_list(rows)


def _model(vocab_size):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    return LlamaForCausalLM(config)


COMMON = dict(
    max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True,
    bf16=False, fp16=False, seed=0, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
)  # fmt: skip


def _logs(trainer):
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


def _compare(stock, ours, *, rel=2e-4, abs_=2e-5):
    assert len(stock) == len(ours) >= 3
    for step, (a, b) in enumerate(zip(stock, ours)):
        assert set(a) == set(b), f"step {step}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            if "time" in key or "per_second" in key:
                continue
            if isinstance(a[key], float) and math.isnan(a[key]):
                assert math.isnan(b[key]), f"step {step} {key}"
                continue
            assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_), f"step {step} {key}: {b[key]} vs {a[key]}"


def _run_pair(build, **kwargs):
    """Train stock TRL and the Liger subclass from the same weights; return both log histories."""
    stock = _logs(build(False, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no silent fallback to TRL's loss
        ours = _logs(build(True, **kwargs))
    return stock, ours


# ----------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type=["sigmoid"]),
        dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], beta=0.3),
        dict(loss_type=["robust"], label_smoothing=0.1, precompute_ref_log_probs=True),
    ],
    ids=["sigmoid", "ipo+sft", "robust-precomputed-ref"],
)
def test_dpo_matches_stock(options, tokenizer, preference_dataset, tmp_path):
    def build(liger, **_):
        model = _model(len(tokenizer))
        cls = liger_trl.LigerDPOTrainer if liger else trl.DPOTrainer
        args = trl.DPOConfig(output_dir=str(tmp_path / str(liger)), max_length=32, **COMMON, **options)
        return cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_dataset,
                   processing_class=tokenizer)  # fmt: skip

    stock, ours = _run_pair(build)
    assert {"rewards/chosen", "logps/rejected", "logits/chosen", "entropy", "mean_token_accuracy"} <= set(ours[0])
    _compare(stock, ours)


def test_dpo_peft_reference_and_enable(tokenizer, preference_dataset, tmp_path):
    peft = pytest.importorskip("peft")

    def build(liger, **_):
        model = _model(len(tokenizer))
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = trl.DPOConfig(output_dir=str(tmp_path / str(liger)), max_length=32, **COMMON)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=preference_dataset, processing_class=tokenizer,
                                 peft_config=lora)  # fmt: skip
        # the reference is the base model (adapter disabled), as in stock TRL
        return liger_trl.enable(trainer) if liger else trainer

    stock, ours = _run_pair(build)
    _compare(stock, ours)


def test_dpo_unsupported_option_falls_back(tokenizer, preference_dataset, tmp_path):
    model = _model(len(tokenizer))
    args = trl.DPOConfig(output_dir=str(tmp_path), max_length=32, ld_alpha=0.5, **{**COMMON, "max_steps": 1})
    trainer = liger_trl.LigerDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                        train_dataset=preference_dataset, processing_class=tokenizer)  # fmt: skip
    with pytest.warns(UserWarning, match="ld_alpha"):
        trainer.train()


def test_enable_rejects_other_trainers():
    with pytest.raises(TypeError, match="enable\\(\\) supports"):
        liger_trl.enable(object())


# ----------------------------------------------------------------------------------------------------
# ORPO, CPO
# ----------------------------------------------------------------------------------------------------


def test_orpo_matches_stock(tokenizer, preference_dataset, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    def build(liger, **_):
        cls = liger_trl.LigerORPOTrainer if liger else ORPOTrainer
        args = ORPOConfig(output_dir=str(tmp_path / str(liger)), max_length=32, beta=0.2, **COMMON)
        model = _model(len(tokenizer))
        return cls(model=model, args=args, train_dataset=preference_dataset, processing_class=tokenizer)

    stock, ours = _run_pair(build)
    assert {"log_odds_ratio", "nll_loss", "logits/chosen"} <= set(ours[0])
    _compare(stock, ours)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_cpo_matches_stock(loss_type, tokenizer, preference_dataset, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    def build(liger, **_):
        cls = liger_trl.LigerCPOTrainer if liger else CPOTrainer
        extra = dict(cpo_alpha=0.0, beta=2.0) if loss_type == "simpo" else dict(label_smoothing=0.1)
        args = CPOConfig(output_dir=str(tmp_path / str(liger)), max_length=32, loss_type=loss_type, **extra, **COMMON)
        model = _model(len(tokenizer))
        return cls(model=model, args=args, train_dataset=preference_dataset, processing_class=tokenizer)

    stock, ours = _run_pair(build)
    _compare(stock, ours)


# ----------------------------------------------------------------------------------------------------
# KTO
# ----------------------------------------------------------------------------------------------------


def test_kto_matches_stock(tokenizer, unpaired_dataset, tmp_path):
    def build(liger, **_):
        model = _model(len(tokenizer))
        cls = liger_trl.LigerKTOTrainer if liger else trl.KTOTrainer
        args = trl.KTOConfig(output_dir=str(tmp_path / str(liger)), max_length=32, desirable_weight=1.2, **COMMON)
        return cls(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=unpaired_dataset,
                   processing_class=tokenizer)  # fmt: skip

    stock, ours = _run_pair(build)
    assert {"kl", "rewards/chosen", "logits/rejected"} <= set(ours[0])
    _compare(stock, ours)


# ----------------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------------


def _even_words_reward(completions, **_):
    """Fraction of words with an even index: varies across a prompt's generations (non-zero advantages)."""
    rewards = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("w")]
        rewards.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(1, len(words)))
    return rewards


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="dapo"),
        dict(loss_type="dapo", steps_per_generation=2),
        dict(loss_type="grpo", beta=0.1, num_iterations=2, epsilon=0.1),
        dict(loss_type="cispo", num_iterations=2, epsilon_high=1.05),
        dict(loss_type="sapo", beta=0.05, num_iterations=2),
        dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2),
        dict(loss_type="vespo", num_iterations=2),
    ],
    ids=["dapo", "dapo-two-steps-per-generation", "grpo-kl-two-iterations", "cispo", "sapo-kl", "luspo", "vespo"],
)
def test_grpo_matches_stock(options, tokenizer, tmp_path):
    gen = torch.Generator().manual_seed(2)
    prompts = datasets.Dataset.from_list([{"prompt": _sentence(gen, 3 + i % 3)} for i in range(8)])

    # a path: with beta != 0 GRPOTrainer loads its reference model from the policy's checkpoint
    model_path = str(tmp_path / "model")
    _model(len(tokenizer)).save_pretrained(model_path)

    def build(liger, **_):
        cls = liger_trl.LigerGRPOTrainer if liger else trl.GRPOTrainer
        common = {**COMMON, "per_device_train_batch_size": 4}
        args = trl.GRPOConfig(
            output_dir=str(tmp_path / str(liger)), num_generations=4, max_completion_length=6,
            temperature=0.9, **options, **common,
        )  # fmt: skip
        return cls(model=model_path, reward_funcs=_even_words_reward, args=args, train_dataset=prompts,
                   processing_class=tokenizer)  # fmt: skip

    stock, ours = _run_pair(build)
    expected = {"cispo": "cispo_clip_ratio", "vespo": "vespo/phi_seq_mean", "sapo": "entropy"}
    assert {"entropy", expected.get(options["loss_type"], "clip_ratio/region_mean")} <= set(ours[0])
    _compare(stock, ours)
