"""The "lm2" setting's model: the embedded LM re-trained so that its experts differ, cached on disk.

The embedded model's experts are upcycled copies of one FFN and stay alike, so merging methods do
not separate on it. lm2 starts from it and applies Drop-Upcycling (Nakamura et al., ICLR 2025): half
of each expert's hidden neurons are redrawn at random, a different half per expert, then the MoE
trains on (top-2, per-layer balance loss) with scripts/train_embedded_model.py's own functions.
Seeds are fixed, so the same torch and thread count give the same model; it is trained on first use
(about 600 MoE steps) into benchmarks/cache/lm2-<settings>/ and loaded from there afterwards.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from mcsmoe_deploy.demo import embedded_model_dir

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
CACHE_DIR = Path(__file__).parent / "cache"
# train_model's arguments beyond `out` and `init_from`
LM2_TRAINING = {"steps": 600, "seed": 0, "moe_lr": 2e-3, "reinit_ratio": 0.5, "aux_coef": 0.1}
# the "lm2-mild" setting: the same with a quarter of each expert's neurons redrawn, experts between alike and apart
LM2_MILD_TRAINING = {**LM2_TRAINING, "reinit_ratio": 0.25}
FACTS = "lm2.json"


def lm2_folder(training: dict = LM2_TRAINING) -> Path:
    """The cache folder of the model trained with `training`."""
    tag = "-".join(f"{key}{value:g}" for key, value in sorted(training.items()))
    return CACHE_DIR / f"lm2-{tag}"


def lm2_model_dir(training: dict = LM2_TRAINING, retrain: bool = False) -> Path:
    """A Hugging Face folder with the lm2 model (and tokenizer), trained now unless cached.

    The folder holds lm2.json: the training arguments, train_seconds and the held-out perplexity at
    training time; a folder whose arguments differ is trained again.
    """
    folder = lm2_folder(training)
    try:
        facts = json.loads((folder / FACTS).read_text())
    except (OSError, ValueError):
        facts = {}
    if not retrain and facts.get("training") == training:
        return folder
    sys.path.insert(0, str(SCRIPTS))
    from train_embedded_model import train_model  # noqa: E402 (a script, not a package module)

    start = time.perf_counter()
    print(f"[lm2] training the lm2 model into {folder} (once; cached afterwards)", flush=True)
    summary = train_model(folder, init_from=embedded_model_dir(), **training)
    facts = {"training": training, "train_seconds": round(time.perf_counter() - start, 1),
             "heldout_perplexity": round(summary["trained_ppl"], 4), "routing": summary["routing"]}
    (folder / FACTS).write_text(json.dumps(facts, indent=1) + "\n")
    print(f"[lm2] trained in {facts['train_seconds']:.0f} s, held-out perplexity {summary['trained_ppl']:.2f}",
          flush=True)
    return folder
