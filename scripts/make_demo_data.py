"""One-off tool: the real demo set shipped in src/melanoma/demo_data/isic-uda1/ (already committed).

Copies the ISIC UDA-1 development set (CC0, ../shared/data/isic-uda1) at a short side of 192 px
(Lanczos, JPEG quality 90: about 6 MB), and writes its manifest with a fixed, stratified 20% test
split. Near-duplicates found by the audit are kept on one side of the split (grouped), so the
demo's test split holds no copy of a training lesion.

    .venv/bin/python scripts/make_demo_data.py [SOURCE_DIR]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold

from melanoma.audit import audit_records

EDGE, QUALITY, TEST_SHARE, SEED = 224, 90, 0.2, 0


def main(source: Path, target: Path) -> None:
    manifest = pd.read_csv(source / "manifest.csv", dtype=str, keep_default_na=False)
    records = pd.DataFrame({"path": [str(source / p) for p in manifest["path"]],
                            "label": (manifest["label"] == "malignant").astype(int), "split": "train"})
    images, pairs, summary = audit_records(records, classes=("benign", "malignant"))
    print(f"audit: {len(pairs)} duplicate pairs, {summary['duplicate_groups']} groups")
    groups = images.set_index("path").loc[records["path"], "group"].to_numpy()
    folds = StratifiedGroupKFold(n_splits=round(1 / TEST_SHARE), shuffle=True, random_state=SEED)
    _, test_index = next(folds.split(records, records["label"], groups))
    split = pd.Series("train", index=manifest.index)
    split.iloc[test_index] = "test"

    (target / "images").mkdir(parents=True, exist_ok=True)
    for rel in manifest["path"]:
        with Image.open(source / rel) as image:
            image = image.convert("RGB")
            scale = EDGE / min(image.size)
            size = (round(image.width * scale), round(image.height * scale))
            image.resize(size, Image.Resampling.LANCZOS).save(target / rel, "JPEG", quality=QUALITY)
    columns = ["path", "label", "split", "age_approx", "sex", "diagnosis", "melanocytic"]
    manifest.assign(split=split)[columns].to_csv(target / "manifest.csv", index=False)
    shutil.copy(source / "ATTRIBUTION.txt", target / "ATTRIBUTION.txt")
    counts = manifest.assign(split=split).groupby(["split", "label"]).size()
    print(counts.to_string())


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else root.parent / "shared/data/isic-uda1",
         root / "src/melanoma/demo_data/isic-uda1")
