"""DPO with TRL where the loss is liger_kernels' fused DPO loss: the (batch x seq x vocab) logits of the
policy and of the reference model are never materialized.

    python examples/trl_dpo.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized
    python examples/trl_dpo.py --tiny        # offline smoke run: tiny random Llama, toy data, CPU

The only change from a stock TRL script is the trainer class (or `liger_plugins.trl.enable(trainer)`).
ORPO, CPO/SimPO, KTO and GRPO work the same way: LigerORPOTrainer, LigerCPOTrainer, LigerKTOTrainer,
LigerGRPOTrainer.
"""

import argparse

from trl import DPOConfig

from liger_plugins.trl import LigerDPOTrainer


def tiny_setup():
    """A 2-layer Llama, a word-level tokenizer and 16 preference pairs, built locally."""
    import tokenizers
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(100)]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>"] + words)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)  # fmt: skip
    rows = [
        {"prompt": " ".join(words[i : i + 4]), "chosen": " " + words[(i + 4) % 100], "rejected": " " + words[i]}
        for i in range(16)
    ]
    return LlamaForCausalLM(config), tokenizer, Dataset.from_list(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct")
    parser.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized")
    parser.add_argument("--output-dir", default="dpo-liger")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--tiny", action="store_true", help="offline smoke run on CPU")
    args = parser.parse_args()

    if args.tiny:
        import copy

        model, tokenizer, dataset = tiny_setup()
        ref_model = copy.deepcopy(model)
        extra = dict(use_cpu=True, bf16=False, max_steps=min(args.max_steps, 4), learning_rate=1e-3)
    else:
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="bfloat16")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        dataset = load_dataset(args.dataset, split="train")
        ref_model = None  # TRL loads a frozen copy of the policy
        extra = dict(max_steps=args.max_steps)

    config = DPOConfig(
        output_dir=args.output_dir, per_device_train_batch_size=4, beta=0.1, loss_type=["sigmoid"],
        logging_steps=1 if args.tiny else 10, report_to=[], save_strategy="no", **extra,
    )  # fmt: skip
    trainer = LigerDPOTrainer(
        model=model, ref_model=ref_model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()


if __name__ == "__main__":
    main()
