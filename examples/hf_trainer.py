"""Train a causal LM with the stock Hugging Face Trainer running liger-plugins' kernels.

    python examples/hf_trainer.py                    # tiny random Llama on CPU, a few steps, seconds
    python examples/hf_trainer.py --callback         # the same through LigerCallback
    python examples/hf_trainer.py --model PATH --steps 200 --batch 8 --seq 2048 --bf16   # a real model, GPU

The one thing to add to an existing script is `liger_plugins.hf.enable()` before the Trainer runs:
`TrainingArguments(use_liger_kernel=True, liger_kernel_config=...)` then means liger-plugins (the
`liger-kernel` package is not needed, and not used if installed). Data here is random tokens, so the
script needs no download; on CPU the kernels run their torch reference (Triton needs CUDA tensors).
"""

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import liger_plugins.hf


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="pretrained model path (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--callback", action="store_true", help="use LigerCallback instead of use_liger_kernel")
    parser.add_argument("--output-dir", default="hf_trainer_out")
    args = parser.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("liger_plugins").setLevel(logging.INFO)  # print what was patched

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if args.bf16 else None)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, max_position_embeddings=args.seq)
        model = AutoModelForCausalLM.from_config(config)

    kernel_config = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True}
    if args.callback:
        callbacks, use_flag = [liger_plugins.hf.LigerCallback(**kernel_config)], False
    else:
        liger_plugins.hf.enable()  # the one line: use_liger_kernel=True now runs liger-plugins
        callbacks, use_flag = [], True

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_liger_kernel=use_flag,
        liger_kernel_config=kernel_config if use_flag else None,
    )
    dataset = RandomTokens(args.steps * args.batch * 2, args.seq, model.config.vocab_size)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()

    print(f"norm forward: {model.model.norm.forward.__qualname__}")  # liger.rms_norm_forward when patched
    print("losses:", [round(entry["loss"], 4) for entry in trainer.state.log_history if "loss" in entry])


if __name__ == "__main__":
    main()
