"""Train a Hugging Face causal LM inside a LightningModule with liger-plugins' kernels.

    python examples/lightning_train.py                               # tiny random Llama, CPU, one process
    python examples/lightning_train.py --strategy ddp --devices 2    # two CPU processes (gloo)
    python examples/lightning_train.py --accelerator gpu --devices 8 --strategy fsdp --precision bf16-true

The one thing to add: `LigerCallback()` in the Trainer's callbacks. It finds the Hugging Face model
inside the module and patches it before the strategy wraps it, also when the model is built in
`configure_model` as here (the pattern for models sharded at creation). `--build-in init` builds it in
`__init__` instead. Data is random tokens; on CPU the kernels run their torch reference.
"""

import argparse

import lightning.pytorch as pl
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from liger_plugins.lightning import LigerCallback


class CausalLM(pl.LightningModule):
    def __init__(self, config, build_in="configure_model", lr=1e-3):
        super().__init__()
        self.config, self.lr, self.model = config, lr, None
        if build_in == "init":
            self.configure_model()

    def configure_model(self):
        if self.model is None:  # Lightning may call this hook once per stage
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(self.config)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def random_tokens(n, seq, vocab, batch):
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in ids], batch_size=batch)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--build-in", choices=["configure_model", "init"], default="configure_model")
    parser.add_argument("--no-liger", action="store_true", help="train without the kernels, to compare")
    args = parser.parse_args()

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=args.seq)
    callbacks = [] if args.no_liger else [LigerCallback(rope=True, rms_norm=True, swiglu=True)]
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy, precision=args.precision,
        max_steps=args.steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
        log_every_n_steps=1,
    )
    module = CausalLM(config, build_in=args.build_in)
    trainer.fit(module, random_tokens(args.steps * args.batch * args.devices, args.seq, config.vocab_size, args.batch))
    if trainer.is_global_zero:
        print(f"norm forward: {module.model.model.norm.forward.__qualname__}")  # liger.rms_norm_forward if patched
        print(f"final train_loss: {trainer.callback_metrics['train_loss'].item():.4f}")


if __name__ == "__main__":
    main()
