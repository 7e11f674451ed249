"""Turn a finished training run into a shipped model folder, `models/<name>/`, and tune the ensemble.

model.pt (the best epoch's weights and config, no optimizer), model.onnx, config.json, split.json,
log.jsonl, metrics.json (validation and test evaluation; with the ONNX file, also how far OpenVINO bf16's masks
agree with f32's: `brainmets.precision`) and MODEL_CARD.md. Every choice is made on the
validation patients (the epoch during training; here the threshold, the lesion mode and sizes), through the
serving engine; the test patients are then scored once with what was chosen.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from brainmets.cache import Arrays
from brainmets.checkpoints import load_checkpoint, load_hashed_checkpoint, model_from_checkpoint, save_atomic
from brainmets.config import NETWORKS, PostprocessConfig
from brainmets.evaluation import engine_probabilities, evaluate, report, tune_postprocessing
from brainmets.inference import Network, Predictor
from brainmets.metrics import dice
from brainmets.models import count_parameters
from brainmets.precision import AGREEMENT_KEY
from brainmets.registry import ENSEMBLE, SHIPPED, best_name
from brainmets.report import Run


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """A report without its per-patient rows."""
    return {k: v for k, v in r.items() if k != "per_patient"}


def choose_and_score(predictor: Predictor, arrays: Arrays, split: dict[str, list[str]]) -> tuple[PostprocessConfig, dict]:
    """Tune post-processing on validation, then score test with it (and with the other lesion mode, and with
    FLAIR alone in all three channels, per patient too), all through `predictor`'s engine."""
    val = engine_probabilities(predictor, arrays, split["val"], progress=True)
    tuned = tune_postprocessing(arrays, split["val"], val)
    post = PostprocessConfig(**tuned["post"])
    test = engine_probabilities(predictor, arrays, split["test"], progress=True)
    # The chosen setting is its mode's best, so its test report is one of these.
    by_mode = {m: report(arrays, split["test"], test, PostprocessConfig(**t["post"])) for m, t in tuned["modes"].items()}
    chosen = by_mode[tuned["mode"]]
    modes = {m: summary(r) for m, r in by_mode.items()}
    predictor.post = post
    flair = evaluate(predictor, arrays, split["test"], flair=True, progress=True)
    network = predictor.networks[0]
    metrics = {"split": "test", "runtime": network.runtime, "precision": network.precision,
               "validation_tuning": tuned, "validation": summary(report(arrays, split["val"], val, post)),
               "test_by_mode": modes, "flair_only": flair, **chosen}
    return post, metrics


def ship(run: Path, arrays: Arrays, out: Path, hardware: str, data_label: str, onnx: bool = True) -> dict:
    """`run`: a training run folder (best.pt) or a shipped folder (model.pt), which may be `out` itself."""
    run, out = Path(run), Path(out)
    ckpt = load_checkpoint(run / "best.pt" if (run / "best.pt").exists() else run / "model.pt")
    model, cfg = model_from_checkpoint(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("split.json", "log.jsonl"):
        if not (out / name).exists() or not (out / name).samefile(run / name):
            shutil.copyfile(run / name, out / name)

    def write(cfg) -> Path:
        keep = ("model", "epoch", "best_val_dice", "split")
        save_atomic({**{k: ckpt[k] for k in keep}, "config": cfg.to_dict()}, out / "model.pt")
        if onnx:
            from brainmets.export import export_onnx

            export_onnx(out / "model.pt", out / "model.onnx")
        else:
            (out / "model.onnx").unlink(missing_ok=True)
        cfg.save(out / "config.json")
        return out / "model.pt"

    # The weights are written first so that tuning runs the very engine that will serve them; the tuned rule
    # then goes into the config, which changes the checkpoint's hash, hence the second export.
    predictor = Predictor([Network.load(write(cfg))], cfg.name)
    post, scores = choose_and_score(predictor, arrays, ckpt["split"])
    cfg = cfg.with_post(post)
    write(cfg)
    metrics = {"model": cfg.name, "data": data_label, "checkpoint_epoch": ckpt["epoch"], **scores}
    agreement = precision_agreement(out / "model.pt", arrays, ckpt["split"]["test"]) if onnx else None
    if agreement:
        metrics[AGREEMENT_KEY] = agreement
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out, Run.load(cfg.name, out), count_parameters(model), ckpt["epoch"], hardware, data_label)
    return metrics


def precision_agreement(checkpoint: Path, arrays: Arrays, patients: list[str]) -> dict | None:
    """Per patient, the Dice of OpenVINO bf16's masks against f32's (the model's post-processing), for these
    weights: the record `metrics.json` keeps, by which `BRAINMETS_PRECISION=auto` never serves a bf16 that
    disagrees. None on a CPU that cannot run bf16 (OpenVINO would compare f32 with itself)."""
    networks = {p: Network.load(checkpoint, "openvino", precision=p) for p in ("f32", "bf16")}
    if networks["bf16"].precision != "bf16":
        return None
    stacks = {}
    for p, network in networks.items():
        predictor = Predictor([network], f"{network.cfg.name} {p}")
        probs, start = engine_probabilities(predictor, arrays, patients, progress=True), 0
        stacks[p] = []
        for patient in patients:
            n = len(arrays.rows(patient))
            stacks[p].append(predictor.mask_stack(probs[start:start + n]))
            start += n
    return {"checkpoint_sha256": load_hashed_checkpoint(checkpoint)[1],
            "bf16_dice_vs_f32": {patient: dice(b, f) for patient, b, f in zip(patients, stacks["bf16"], stacks["f32"])}}


def ship_ensemble(models: Path, arrays: Arrays, data_label: str) -> dict:
    """`models/ensemble/`: the post-processing of both shipped networks averaged, tuned on their (shared)
    validation patients, and its metrics; then says which of the three validation prefers as `best`."""
    splits = [json.loads((models / n / "split.json").read_text()) for n in SHIPPED]
    if any(s[k] != splits[0][k] for s in splits for k in ("val", "test")):
        raise ValueError("the shipped networks were split differently; an ensemble needs one validation and test set")
    predictor = Predictor([Network.load(models / n / "model.pt") for n in SHIPPED], ENSEMBLE)
    post, scores = choose_and_score(predictor, arrays, splits[0])
    folder = models / ENSEMBLE
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "postprocess.json").write_text(json.dumps(dataclasses.asdict(post), indent=2) + "\n")
    metrics = {"model": ENSEMBLE, "members": list(SHIPPED), "data": data_label, **scores}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return {**metrics, "best": best_name()}


def _mode_text(cfg) -> str:
    size = f" of at least {cfg.min_lesion_voxels} voxels" if cfg.min_lesion_voxels else ""
    if cfg.lesion_mode == "single":
        return f"only the 3-D lesion{size} with the largest summed probability (`single` mode: one lesion per patient)"
    return f"every 3-D lesion{size} (`multiple` mode)"


def _other_modes(m: dict) -> str:
    return " ".join(f"In `{mode}` mode: Dice per patient mean {r['dice_per_patient_mean']:.3f}, "
                    f"{r['lesion_fp_per_patient']:.2f} false-positive lesions per patient."
                    for mode, r in m["test_by_mode"].items())


def _labels_text(cfg) -> str:
    """What the lesion was in the training masks: `--labels`, which `evaluate` uses again by default."""
    if getattr(cfg, "labels", None):
        return (f"**Lesion**: label values {', '.join(map(str, cfg.labels))} of the label files (`--labels`; "
                f"`brainmets evaluate` uses the same unless given others).")
    return "**Lesion**: every non-zero label of the masks."


def write_model_card(folder: Path, run: Run, params: int, best_epoch: int, hardware: str, data_label: str) -> None:
    cfg, m = run.config, run.metrics
    split = json.loads((folder / "split.json").read_text())
    recipe = (f"{cfg.recipe} recipe: Adam lr {cfg.lr:g} ({cfg.lr_schedule}), batch {cfg.batch_size}, loss "
              f"{cfg.loss}, {'crops of ' + str(cfg.crop_size) + ' px' if cfg.crop_size else 'whole slices'}, "
              f"{cfg.empty_fraction:.0%} of empty slices per epoch, {'bf16 autocast' if cfg.bf16 else 'fp32'}, "
              f"augmentation: rotation ±{cfg.rotate_deg:g}°, zoom {cfg.scale[0]:g}–{cfg.scale[1]:g}, flips"
              + (f", FLAIR standing in for a T1 channel in {cfg.missing_sequence_p:.0%} of slices"
                 if cfg.missing_sequence_p else "")
              + (f"; the last {cfg.whole_slice_phase:.0%} of the run on whole slices with every empty slice"
                 if cfg.whole_slice_phase else "")
              + (f"; fine-tuned from the weights `{cfg.init_from}` held when the run started"
                 + (f" (sha256 {cfg.init_sha256[:16]})" if cfg.init_sha256 else "")
                 + ", so the epochs and minutes below come on top of that model's own training"
                 if cfg.init_from else ""))
    speed = f"{run.images_per_s:.1f} training images/s"
    if run.idle_share is not None:
        speed += (f", {run.idle_share:.0%} of the idle benchmark of the same step that the run took on the same "
                  f"machine ({run.idle_images_per_s:.1f} img/s)")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    text = f"""# Model card: {cfg.name}

- **Network**: MONAI {NETWORKS[cfg.name].monai_class}, widths {list(cfg.model.widths)}, \
{params / 1e6:.2f} M parameters; input 3 × {cfg.preprocess.image_size}² (pre-contrast, FLAIR, post-contrast), \
output one lesion logit per pixel. **Post-processing** (chosen on the validation patients, per-patient Dice \
{m['validation']['dice_per_patient_mean']:.3f} there): threshold {cfg.threshold} on the sigmoid; a patient's \
stack (or a volume, a study) keeps {_mode_text(cfg)}; a lone slice drops components under {cfg.min_lesion_px} px. \
Served by {m['runtime']} ({m['precision']}), which is also what every number below was measured with.
- **Data**: {data_label}; split by patient (seed {split['seed']}): {len(split['train'])} train, \
{len(split['val'])} validation, {len(split['test'])} test patients (`split.json`). {_labels_text(cfg)}
- **Preprocessing**: CLAHE (clip {cfg.preprocess.clahe_clip}, {cfg.preprocess.clahe_tile}×{cfg.preprocess.clahe_tile} \
tiles) per channel, intensities to [0, 1] (`brainmets.preprocessing.preprocess`).
- **Training**: {recipe}. {len(run.log)} epochs in {run.train_minutes:.0f} minutes on {hardware}, at {speed} (medians over epochs); best validation \
per-patient Dice {max(h['val_dice'] for h in run.validated):.3f} at epoch {best_epoch} (the weights shipped).
- **Test metrics** ({m['patients']} patients, {m['slices']} slices, never seen in training or selection):
  Dice per patient mean {fmt(m['dice_per_patient_mean'])} (median {fmt(m['dice_per_patient_median'])}), \
Dice per lesion slice {fmt(m['dice_lesion_slices_mean'])}, pooled Dice {fmt(m['dice_pooled'])}, IoU \
{fmt(m['iou_pooled'])}, precision {fmt(m['precision_pooled'])}, recall {fmt(m['recall_pooled'])}, HD95 \
{fmt(m['hd95_px_mean'])} px, lesion sensitivity {fmt(m['lesion_sensitivity'])}, \
{fmt(m['lesion_fp_per_patient'])} false-positive lesions per patient; worst patient {fmt(m['dice_per_patient_min'])}, \
{m['empty_predictions']} patients with a lesion left empty. {_other_modes(m)} With FLAIR alone in all three \
channels (a study without T1 series): Dice per patient mean {fmt(m['flair_only']['dice_per_patient_mean'])}. \
Full report: `metrics.json`.
- **Reproduce**: `brainmets evaluate --data <Data.zip of the test patients> --model {cfg.name} --split all`.
- **Known limits**: trained on {len(split['train'])} patients of one public collection (TCGA lower-grade \
glioma, 5 institutions, FLAIR-abnormality masks by one reader); not validated on metastases, other scanners \
or protocols; the network sees one slice at a time (only the post-processing works in 3-D); research use only, not a medical device.
- **Training data and its terms**: TCGA-LGG MRI from The Cancer Imaging Archive (TCIA) with the FLAIR-abnormality \
masks of Buda et al.; the brainmets code is MIT-licensed, but these weights were trained on that data and are to be \
used under the TCIA Data Usage Policy. Cite M. Buda, A. Saha, M. A. Mazurowski, "Association of genomic subtypes of \
lower-grade gliomas with shape features automatically extracted by a deep learning algorithm", Computers in Biology \
and Medicine 109 (2019), 218–225, doi:10.1016/j.compbiomed.2019.05.002.
"""
    (folder / "MODEL_CARD.md").write_text(text, encoding="utf-8")  # the card holds ×, ³: never the locale's
