"""Build a tiny local model, tokenizer and dataset for the Axolotl configs (no download).

    python integrations/axolotl/tiny.py                       # -> out/axolotl_tiny/{model,data.jsonl}
    python integrations/axolotl/tiny.py out/axolotl_gpu --model-config configs/demo/llama_gpu.json

The tokenizer is a byte-level BPE trained on the corpus shipped in liger_plugins/data/; the model has
random weights (seed 0) from a model config of configs/; the dataset is that corpus cut into short
passages, one `{"text": ...}` per line (Axolotl's `completion` type). configs/axolotl_*.yml and
examples/axolotl.yml read these paths relative to the repository root.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "liger_plugins" / "data" / "sample.txt"
DEFAULT_OUT = ROOT / "out" / "axolotl_tiny"
DEFAULT_MODEL_CONFIG = ROOT / "configs" / "tiny" / "llama.json"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3; the tiny configs use pad 0, bos 1, eos 2


def passages(text: str, max_chars: int = 240) -> list[str]:
    """The corpus as runs of whole sentences of at most ~max_chars characters."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    out, current = [], ""
    for sentence in sentences:
        if current and len(current) + len(sentence) > max_chars:
            out.append(current)
            current = ""
        current = f"{current} {sentence}".strip()
    return out + [current] if current else out


def build(out: Path = DEFAULT_OUT, model_config: Path = DEFAULT_MODEL_CONFIG) -> Path:
    """Write `out/model` (tokenizer, config, weights) and `out/data.jsonl`; returns `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    text = CORPUS.read_text()
    config = AutoConfig.for_model(**json.loads(Path(model_config).read_text()))

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(config.vocab_size, 300), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(out / "model")

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "model")
    with open(out / "data.jsonl", "w") as f:
        for passage in passages(text):
            f.write(json.dumps({"text": passage}) + "\n")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model-config", type=Path, default=DEFAULT_MODEL_CONFIG)
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.model_config)}")


if __name__ == "__main__":
    main()
