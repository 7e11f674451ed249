"""`brainmets split | train | evaluate | predict | export | compare | serve | app | run | pacs` — the command line."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from brainmets.config import LESION_MODES, MODEL_NAMES, PreprocessConfig, TrainConfig, make_config
from brainmets.datasets import LAYOUTS
from brainmets.inputs.align import REGISTER
from brainmets.registry import CHOICES

app = typer.Typer(help="Brain lesion segmentation in MRI slices: split, train, evaluate, predict, serve.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="The Data.zip or a folder of <name>.tif + <name>_mask.tif pairs (also png/webp/jpg), at any depth.")]
CasesDataOpt = Annotated[Path, typer.Option("--data", "-d", help="A folder or zip: the reference layout (<name>.tif + <name>_mask.tif pairs, also png/webp/jpg, at any depth), BraTS case folders (<case>-t2f/-t1n/-t1c/-seg.nii.gz or <case>_flair/_t1/_t1ce/_seg), an nnU-Net raw dataset (dataset.json, imagesTr/, labelsTr/) or DICOM studies each with a DICOM SEG; detected from what is there (see --layout).")]
Layout = Enum("Layout", [(name, name) for name in LAYOUTS], type=str)
LayoutOpt = Annotated[Layout, typer.Option(help="The layout of --data; auto detects it from what is there.")]
LabelsOpt = Annotated[Optional[str], typer.Option(help="Label values forming the lesion in a case layout's label files, comma-separated, e.g. 1,3 (BraTS-METS: 1 necrosis, 2 oedema, 3 enhancing); default: every non-zero label.")]


ModelName = Enum("ModelName", [(name, name) for name in MODEL_NAMES], type=str)
MODEL_HELP = f"{', '.join(CHOICES)}, a .pt checkpoint or a run folder."
LesionMode = Enum("LesionMode", [(mode, mode) for mode in LESION_MODES], type=str)
Register = Enum("Register", [(setting, setting) for setting in REGISTER], type=str)
RegisterOpt = Annotated[Register, typer.Option(help="Rigid registration of each sequence onto FLAIR (patient motion): auto registers every series off FLAIR's grid and keeps it only where it improves the similarity; on: every series; off: the headers' geometry alone.")]


DeviceOpt = Annotated[Optional[str], typer.Option(help="auto (a CUDA GPU where PyTorch sees one, else the CPU), cpu or cuda; default: $BRAINMETS_DEVICE, else auto.")]
PrecisionOpt = Annotated[Optional[str], typer.Option(help="auto (whichever of f32 and bf16 measured faster on this machine, f32 where bf16's masks disagree), bf16 or f32; default: $BRAINMETS_PRECISION, else auto.")]


def device_for_this_process(device: str | None) -> None:
    """Checks --device now (an unknown value, or cuda without a GPU, is an error before any work) and hands it
    to the engine through $BRAINMETS_DEVICE: the API server and batch worker processes read it there."""
    from brainmets.inference import DEVICE_ENV, pick_device

    if device:
        pick_device(device)
        os.environ[DEVICE_ENV] = device


class Recipe(str, Enum):
    fast = "fast"
    seed = "seed"


class Side(str, Enum):
    test = "test"
    val = "val"
    all = "all"


def friendly_errors(fn):
    """Expected failures (bad data, missing files, bad settings) end with one clear line, exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, OSError) as e:
            # escaped: a path holding [...] is text, not rich markup; soft_wrap: one line at any width
            console.print(f"[red]error:[/red] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def load_arrays(data: Path, pre: PreprocessConfig, layout: str = "auto", labels: tuple[int, ...] | None = None):
    """The dataset at `data` in its layout and its preprocessed arrays (cached); cases that cannot be read are
    skipped, each named with its reason."""
    from brainmets.cache import preprocessed
    from brainmets.datasets import CaseDataset, describe_labels, open_layout

    dataset = open_layout(data, layout)
    if not isinstance(dataset, CaseDataset):
        if labels:
            console.print("the reference layout's masks are binary: --labels does not apply")
        console.print(f"{data}: {len(dataset.patients)} patients, {len(dataset.slices)} slices")
        return dataset, preprocessed(dataset, pre)
    console.print(f"{data}: {dataset.layout} layout, {len(dataset.patients)} cases; lesion = {describe_labels(labels)}")
    arrays = preprocessed(dataset, pre, labels=labels)
    console.print(f"{len(arrays.patient_ids())} cases read, {len(arrays.patients)} slices")
    for note in arrays.notes:
        console.print(escape(note), soft_wrap=True)
    skipped_report(arrays)
    return dataset, arrays


def without_skipped(s, dataset, arrays):
    """A split (made by `brainmets split` on the cases found) without the cases that could not be read."""
    skipped = set(dataset.patients) - set(arrays.patient_ids())
    if not skipped & set(s.train + s.val + s.test):
        return s
    console.print(f"{len(skipped & set(s.train + s.val + s.test))} case(s) of the split skipped (see below): left out")
    return dataclasses.replace(s, **{side: [p for p in getattr(s, side) if p not in skipped]
                                     for side in ("train", "val", "test")})


def skipped_report(arrays) -> None:
    """The cases left out and why: said when the data is read and again at the end of the run."""
    if arrays.skipped:
        console.print(f"[yellow]{len(arrays.skipped)} case(s) skipped:[/yellow]")
        for why in arrays.skipped:
            console.print(f"  {escape(why)}", soft_wrap=True)


@app.command()
@friendly_errors
def split(
    data: CasesDataOpt,
    out: Annotated[Path, typer.Option(help="Where to write the split (JSON).")] = Path("split.json"),
    test_fraction: Annotated[float, typer.Option(help="Share of all patients held out for testing.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Share of all patients taken from the training side for validation (model selection, early stopping).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the patient shuffle; the same seed and data give the same split.")] = 0,
    layout: LayoutOpt = Layout.auto,
) -> None:
    """Split the patients (never slices; a case layout's cases) into train / validation / test and write split.json."""
    from brainmets.datasets import open_layout
    from brainmets.split import make_split

    dataset = open_layout(data, layout.value)
    s = make_split(list(dataset.patients), test_fraction, val_fraction, seed, dataset.fingerprint())
    s.save(out)
    console.print(f"{out}: {len(s.train)} train, {len(s.val)} validation, {len(s.test)} test patients")


@app.command()
@friendly_errors
def train(
    data: CasesDataOpt,
    model: Annotated[ModelName, typer.Option("--model", "-m", help="Network to train.")],
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, config.json, split.json, log.jsonl.")],
    recipe: Annotated[Recipe, typer.Option(help="'seed': Adam, BCE, 50 epochs, batch 8, lr 0.001, whole slices, fp32. 'fast': 128-px crops with lesion oversampling, 30% of the empty slices each epoch, Dice+BCE, cosine lr, bf16 (see docs/results.md).")] = Recipe.fast,
    split_file: Annotated[Optional[Path], typer.Option("--split", help="split.json to use; made with seed --seed (80/10/10 by patient) if not given.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs (overrides the recipe).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size (overrides the recipe).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate of Adam (overrides the recipe).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Training crop side in px, 0 for whole slices (overrides the recipe).")] = None,
    bf16: Annotated[Optional[bool], typer.Option("--bf16/--fp32", help="bf16 autocast on CPU (overrides the recipe).")] = None,
    deep_supervision: Annotated[bool, typer.Option(help="U-Net++ only: loss on every nested output.")] = False,
    empty_fraction: Annotated[Optional[float], typer.Option(help="Share of the lesion-free training slices drawn each epoch, 1 for all (fast recipe: 0.3; seed: 1).")] = None,
    whole_slice_phase: Annotated[Optional[float], typer.Option(help="Share of the run, at its end, trained on whole slices with every empty slice, as served (fast recipe: 0).")] = None,
    missing_sequence: Annotated[Optional[float], typer.Option(help="Share of training slices whose pre- and/or post-contrast channel is replaced by FLAIR, for studies with FLAIR only (fast recipe: 0.3; seed: 0).")] = None,
    image_size: Annotated[int, typer.Option(help="Side in px every slice is resized to (a multiple of 16); the models ship at 256.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the split (if made here), initialisation and sampling.")] = 0,
    threads: Annotated[int, typer.Option(help="Torch threads; 0 uses every core.")] = 0,
    time_budget: Annotated[Optional[float], typer.Option(help="Minutes; stops before an epoch that would not fit, keeping the best checkpoint.")] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate every n-th epoch and the last (default 1): validation is half of a U-Net++ epoch, so 3 buys about 1.5x the crops in a time budget.")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Start from these weights instead of random ones (fine-tuning): best, unetpp or attention-unet (a shipped model; best or ensemble standing for the ensemble give its member of --model), a run folder or a .pt checkpoint of the same network.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from last.pt (weights, optimizer, epoch).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    layout: LayoutOpt = Layout.auto,
    labels: LabelsOpt = None,
) -> None:
    """Train a network; the best epoch on validation per-patient Dice is kept as best.pt."""
    from brainmets.checkpoints import load_checkpoint
    from brainmets.datasets import parse_labels
    from brainmets.registry import resolve_init
    from brainmets.split import Split, make_split
    from brainmets.training import train as run_training

    lesion_labels = parse_labels(labels)
    init, widths = None, None
    if init_from:
        path, note = resolve_init(init_from, model.value)
        init = str(path)
        if note:
            console.print(note)
    if init:  # a fine-tuned network keeps the widths of the one it starts from
        start = TrainConfig.from_dict(load_checkpoint(Path(init))["config"]).model
        if start.name != model.value:
            raise ValueError(f"--init-from: {init} holds {start.name}, not the requested {model.value}")
        widths = start.widths
    cfg = make_config(model.value, recipe.value, widths=widths, deep_supervision=deep_supervision, epochs=epochs,
                      batch_size=batch_size, lr=lr, bf16=bf16, seed=seed, threads=threads,
                      time_budget_min=time_budget, missing_sequence_p=missing_sequence, val_every=val_every,
                      empty_fraction=empty_fraction, whole_slice_phase=whole_slice_phase,
                      init_from=init, labels=lesion_labels)
    # Size and crop together: the config checks that the crop fits the slice (make_config skips None).
    crop_setting = {} if crop is None else {"crop_size": crop or None}
    cfg = dataclasses.replace(cfg, preprocess=PreprocessConfig(image_size=image_size), **crop_setting)
    dataset, arrays = load_arrays(data, cfg.preprocess, layout.value, lesion_labels)
    if resume and (out / "split.json").exists():
        s = Split.load(out / "split.json")
    elif split_file:
        s = Split.load(split_file)
    else:  # the patients read: a case layout's skipped cases take no place in the split
        s = make_split(arrays.patient_ids(), seed=seed, fingerprint=dataset.fingerprint())
    s = without_skipped(s, dataset, arrays)
    missing = sorted(set(s.train + s.val) - set(arrays.patient_ids()))
    if missing:
        raise ValueError(f"split names {len(missing)} patients not in {data}: {', '.join(missing[:5])}")
    console.print(f"training {cfg.name} ({cfg.recipe} recipe) on {len(s.train)} patients, "
                  f"validating on {len(s.val)}")
    result = run_training(cfg, arrays, s, out, resume=resume, progress=progress)
    if os.environ.get("RANK", "0") == "0":
        console.print(f"best validation per-patient Dice {result['best_val_dice']:.4f}; checkpoints in {out}")
        skipped_report(arrays)


@app.command()
@friendly_errors
def evaluate(
    data: CasesDataOpt,
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)],
    side: Annotated[Side, typer.Option("--split", help="test / val: the patients of the model's own split.json; all: every patient in --data (a held-out set).")] = Side.test,
    out: Annotated[Optional[Path], typer.Option(help="Write the report (JSON) here.")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Probability threshold (default: the model's).")] = None,
    runtime: Annotated[str, typer.Option(help="auto (OpenVINO where exported, as served), openvino, onnxruntime or torch.")] = "auto",
    precision: PrecisionOpt = None,
    device: DeviceOpt = None,
    flair_only: Annotated[bool, typer.Option(help="Feed FLAIR in all three channels, as for a study without T1 series.")] = False,
    lesion_mode: Annotated[Optional[LesionMode], typer.Option(help="single: keep each patient's strongest 3-D lesion; multiple: every one (default: the model's, chosen on validation).")] = None,
    layout: LayoutOpt = Layout.auto,
    labels: Annotated[Optional[str], typer.Option(help="Label values forming the lesion in a case layout's label files, comma-separated, e.g. 1,3; default: the labels the model was trained with (its config), else every non-zero label.")] = None,
) -> None:
    """Evaluate a model through the serving engine: per-patient 3-D Dice, lesion-slice and pooled Dice, IoU,
    precision/recall, HD95, detection."""
    from brainmets.datasets import parse_labels
    from brainmets.evaluation import evaluate as run_evaluation
    from brainmets.inference import Predictor
    from brainmets.checkpoints import load_checkpoint
    from brainmets.provenance import fingerprint

    predictor = Predictor.load(model, runtime, precision=precision, lesion_mode=lesion_mode and lesion_mode.value,
                               device=device)
    if threshold is not None:
        predictor.post = dataclasses.replace(predictor.post, threshold=threshold)
    version = fingerprint(predictor)  # preprocessed arrays: no study is read, so no registration setting
    console.print(f"evaluating {version.version} on {predictor.summary}", soft_wrap=True)
    path = predictor.networks[0].checkpoint
    lesion_labels = parse_labels(labels) if labels else next(
        (n.cfg.labels for n in predictor.networks if n.cfg.labels), None)
    dataset, arrays = load_arrays(data, predictor.preprocess_cfg, layout.value, lesion_labels)
    if side == Side.all:
        patients = arrays.patient_ids()
    else:
        skipped = set(dataset.patients) - set(arrays.patient_ids())  # a case layout's unreadable cases
        patients = [p for p in load_checkpoint(path)["split"][side.value] if p not in skipped]
        missing = sorted(set(patients) - set(arrays.patient_ids()))
        if missing:
            raise ValueError(f"{len(missing)} {side.value} patients of {path} are not in {data} "
                             f"(e.g. {missing[0]}); use --split all to evaluate every patient of {data}")
    report = run_evaluation(predictor, arrays, patients, flair=flair_only, progress=True)
    report = {"runtime": predictor.networks[0].runtime, "precision": predictor.networks[0].precision, **report}
    report = {"model": predictor.name, "checkpoint": str(path), "model_version": version.version,
              "model_provenance": version.record(), "data": str(data), "split": side.value, **report}
    if hasattr(dataset, "layout"):  # a case layout: what the lesion was, and the cases left out
        report.update(layout=dataset.layout, labels=list(lesion_labels) if lesion_labels else None,
                      skipped=list(arrays.skipped))
    _print_report(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"report written to {out}")
    skipped_report(arrays)


def _print_report(r: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{r['model']} on {r['patients']} patients, {r['slices']} slices")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in r.items():
        if isinstance(value, float):
            table.add_row(key, f"{value:.4f}")
    Console().print(table)


@app.command()
@friendly_errors
def predict(
    inputs: Annotated[list[Path], typer.Argument(help="Folders (walked at any depth), Data.zip archives or files: slices (PNG, JPEG, TIFF, WebP, DICOM) and NIfTI volumes (.nii, .nii.gz), told apart by their content; NIfTI case folders, a sequence per file, named as BraTS (<case>-t2f, <case>_flair, ...) or nnU-Net (<CASE>_0000, ...) do. In folders, <name>_mask.<ext> ground truth is passed over; case label files (-seg, _seg, labelsTr/) are never segmented.")],
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = "best",
    out: Annotated[Path, typer.Option(help="Folder for the masks, mirroring the inputs' tree: <name>.png (0/255, the input's size) per slice, <name>_mask.nii.gz (the input's grid) and <name>_lesions.csv per volume; per study (the DICOM files of one study, in one folder or one per series; one patient's numbered slices <patient>_<n>.tif in a folder; a NIfTI case, named <case>) <folder>_mask.nii.gz (on the FLAIR file's grid for a case), <folder>_lesions.csv (3-D lesions) and <folder>.seg.dcm (DICOM input); and summary.csv.")] = Path("predictions"),
    workers: Annotated[Optional[int], typer.Option(min=1, help="Processes, each with its own model and cores/N threads; 1 (the default) runs in this process with every core. With --ray: Ray workers (actors), each loading the model once; default one per CPU of the cluster.")] = None,
    tta: Annotated[bool, typer.Option(help="Average over horizontal and vertical flips (3x the time).")] = False,
    lesion_mode: Annotated[Optional[LesionMode], typer.Option(help="Studies and volumes: single keeps the strongest 3-D lesion, multiple every one (default: the model's, chosen on validation).")] = None,
    register: RegisterOpt = Register.auto,
    ray: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="Run the jobs on a Ray cluster: HOST:PORT of its head node (`ray start --head`), ray://HOST:PORT, auto (RAY_ADDRESS or this machine's cluster), or local (one started on this machine for the run). The driver reads the inputs and writes --out; the nodes need brainmets and the models.")] = None,
    channels: Annotated[Optional[str], typer.Option(help="nnU-Net case folders with no dataset.json beside them or one level up: the channel order of <CASE>_0000, _0001, ..., comma-separated, e.g. FLAIR,T1,T1Gd,T2.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    device: DeviceOpt = None,
) -> None:
    """Segment slices, volumes and studies with the inference engine of the API: one mask per input, a CSV
    summary (one row per file or study), throughput. Run it again to continue: files with a mask and an ok row in summary.csv are skipped."""
    from brainmets.batch import SUMMARY, find_jobs, report, run_batch

    device_for_this_process(device)
    jobs, passed = find_jobs(inputs, out, channels and [name.strip() for name in channels.split(",")])
    summary = run_batch(jobs, out, model, workers, tta, progress=progress, console=console,
                        lesion_mode=lesion_mode and lesion_mode.value, register=register.value, ray=ray)
    for line in report(summary, passed, out):
        console.print(escape(line), soft_wrap=True)
    if summary.failed:
        raise ValueError(f"{summary.failed} of {len(jobs)} files failed; their rows in {out / SUMMARY} say why")


@app.command()
@friendly_errors
def select(
    data: DataOpt,
    data_label: Annotated[str, typer.Option(help="What the data is, for the report.")] = "TCGA LGG (Buda et al. 2019), 88 of 110 patients",
) -> None:
    """Tune the ensemble of the shipped networks on their validation patients (models/ensemble/), score it on
    test, and say which of the three `best` now stands for: the highest validation per-patient Dice."""
    from brainmets.registry import SHIPPED, models_dir
    from brainmets.shipping import ship_ensemble
    from brainmets.checkpoints import load_checkpoint, model_from_checkpoint

    _, cfg = model_from_checkpoint(load_checkpoint(models_dir() / SHIPPED[0] / "model.pt"))
    _, arrays = load_arrays(data, cfg.preprocess)
    metrics = ship_ensemble(models_dir(), arrays, data_label)
    console.print(f"ensemble: validation per-patient Dice {metrics['validation']['dice_per_patient_mean']:.4f}, "
                  f"test {metrics['dice_per_patient_mean']:.4f}; best = {metrics['best']} (chosen on validation)")


@app.command()
@friendly_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; loopback by default (0.0.0.0 opens the API to the network).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    device: DeviceOpt = None,
) -> None:
    """Serve the HTTP API (docs at /docs). Settings come from BRAINMETS_* environment variables: models
    folder, upload limit, threads, workers, queue, CORS origins, precision (see brainmets/api/settings.py);
    /v1/models says which runtime and precision each model runs, and why."""
    import uvicorn

    device_for_this_process(device)
    # No `server: uvicorn` header: responses say nothing about the software behind them. h11, not httptools:
    # httptools buffers request headers without limit (200 MB of headers cost the server 200 MB), h11 refuses
    # past 16 KB; parsing is microseconds against an inference's tens of milliseconds.
    uvicorn.run("brainmets.api.main:app", host=host, port=port, server_header=False, http="h11")


@app.command()
@friendly_errors
def export(
    model: Annotated[str, typer.Argument(help=f"{MODEL_HELP} Every checkpoint the model uses is exported: both networks for the ensemble (or a `best` standing for it).")],
    out: Annotated[Optional[Path], typer.Option(help="ONNX file to write, for a model of one checkpoint; default: beside each checkpoint, with suffix .onnx, where the engine looks for it.")] = None,
) -> None:
    """Export a model's checkpoints to ONNX (config.json beside each), checked against PyTorch within 1e-4."""
    from brainmets import registry
    from brainmets.export import export_onnx

    found = registry.model(model)
    if out and len(found.checkpoints) > 1:
        raise ValueError(f"--out names one file, but {model} stands for {found.name}, which uses "
                         f"{len(found.checkpoints)} checkpoints; leave --out out to write each beside its checkpoint")
    for checkpoint in found.checkpoints:
        result = export_onnx(checkpoint, out)
        console.print(f"{result.onnx} and {result.config} written; largest |ONNX - PyTorch| probability difference "
                      f"{result.max_abs_diff:.1e}")


@app.command()
@friendly_errors
def ship(
    run: Annotated[Path, typer.Option(help="Finished training run folder (best.pt, config.json, split.json, log.jsonl), or a shipped model folder to re-tune in place.")],
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Model folder to write, e.g. models/attention-unet.")],
    hardware: Annotated[str, typer.Option(help="Where it was trained, for the model card.")] = "2-core CPU (no GPU)",
    data_label: Annotated[str, typer.Option(help="What the data is, for the model card.")] = "TCGA LGG (Buda et al. 2019), 88 of 110 patients",
    onnx: Annotated[bool, typer.Option(help="Also export model.onnx.")] = True,
) -> None:
    """Ship a run: weights, ONNX, config, split, log, metrics and a model card in one folder. Post-processing is
    tuned on the run's validation patients through the serving engine; test is scored once, with it."""
    from brainmets.registry import resolve
    from brainmets.shipping import ship as ship_run
    from brainmets.checkpoints import load_checkpoint, model_from_checkpoint

    _, cfg = model_from_checkpoint(load_checkpoint(resolve(run)))
    _, arrays = load_arrays(data, cfg.preprocess, labels=cfg.labels)  # tuned and scored on what it learned
    metrics = ship_run(run, arrays, out, hardware, data_label, onnx=onnx)
    console.print(f"{out}: test per-patient Dice {metrics['dice_per_patient_mean']:.4f} on {metrics['patients']} patients")


@app.command()
@friendly_errors
def compare(
    runs: Annotated[Optional[list[str]], typer.Option("--run", help="LABEL=FOLDER with metrics.json, log.jsonl, config.json; repeatable. Default: the shipped models and docs/seed-recipe.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Data holding the test patients, for the example overlays (skipped without it).")] = None,
    docs: Annotated[Path, typer.Option(help="Where results.md and its figures go.")] = Path("docs"),
) -> None:
    """Regenerate docs/results.md (tables, training curves, per-patient Dice, example overlays)."""
    from brainmets.registry import CANDIDATES, SHIPPED, best_name, models_dir, shipped_metrics
    from brainmets.report import Run, overlay_examples, write_results

    if runs:
        pairs = [r.split("=", 1) for r in runs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("--run takes LABEL=FOLDER")
    else:
        pairs = [[n, models_dir() / n] for n in SHIPPED if (models_dir() / n / "metrics.json").exists()]
        if (docs / "seed-recipe" / "metrics.json").exists():
            pairs.append(["seed recipe", docs / "seed-recipe"])
    loaded = sorted((Run.load(label, Path(folder)) for label, folder in pairs),
                    key=lambda r: -r.metrics["dice_per_patient_mean"])
    if not loaded:
        raise FileNotFoundError("nothing to compare: no --run given and no shipped model has metrics.json")
    examples = best = None
    if data is not None:
        from brainmets.inference import Predictor
        from brainmets.preprocessing import normalize

        # The network validation prefers (the runs are listed by test Dice; test must not choose the example).
        best = max((r for r in loaded if (r.folder / "model.pt").exists()), default=None,
                   key=lambda r: r.metrics.get("validation", {}).get("dice_per_patient_mean", -1))
        if best is None:
            raise FileNotFoundError("--data asks for example overlays, but no compared folder holds a model.pt")
        predictor = Predictor.load(best.folder / "model.pt")
        _, arrays = load_arrays(data, predictor.preprocess_cfg)
        examples = overlay_examples(
            best, arrays, lambda x: predictor.mask_stack(predictor.model_probabilities(normalize(x))))
    shipped = {n: m for n in CANDIDATES if (m := shipped_metrics(n)) and "validation" in m} if not runs else {}
    out = write_results(loaded, docs, examples, shipped, best_name() if shipped else None,
                        best.label if examples else None)
    console.print(f"{out} written")


@app.command("app")
def app_page(
    host: Annotated[str, typer.Option(help="Address the page listens on; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8501,
    api: Annotated[str, typer.Option(help="Base URL of the brainmets API the page calls.")] = "http://127.0.0.1:8000",
    docs: Annotated[Optional[Path], typer.Option(help="Folder with results.md and its figures (default: the repository's docs/).")] = None,
) -> None:
    """Start the Streamlit page; it reaches the API only over HTTP at --api."""
    from brainmets.app.launch import exec_page

    console.print(f"page: http://{host}:{port} (API: {api})")
    exec_page(host, port, api, docs)


@app.command()
def run(
    host: Annotated[str, typer.Option(help="Address both listen on; loopback by default.")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option(help="Port of the API.")] = 8000,
    port: Annotated[int, typer.Option(help="Port of the page.")] = 8501,
) -> None:
    """Start the API (with the shipped models) and the page together; Ctrl-C stops both."""
    from brainmets.app.launch import run_both

    raise typer.Exit(run_both(host, api_port, port, say=console.print))


pacs_app = typer.Typer(help="Segment the studies of a PACS over DICOMweb and store a DICOM SEG beside each. Credentials "
                       "come from $BRAINMETS_DICOMWEB_USER and _PASSWORD, or $BRAINMETS_DICOMWEB_TOKEN.",
                       no_args_is_help=True)
app.add_typer(pacs_app, name="pacs")
UrlOpt = Annotated[Optional[str], typer.Option("--url", help="DICOMweb base URL, e.g. http://localhost:8042/dicom-web (Orthanc). Default: $BRAINMETS_DICOMWEB_URL.")]
PacsModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]


def _pacs_predictor(model: str, device: str | None):
    from brainmets.inference import Predictor

    predictor = Predictor.load(model, device=device)
    console.print(f"{predictor.name} on {predictor.summary}", soft_wrap=True)
    return predictor


def _lesion_table(done) -> None:
    from rich.table import Table

    result = done.result
    console.print(f"study {done.study_uid}: {len(result.lesions)} lesion(s) found by {done.version}; SEG stored as "
                  f"series {done.seg_series_uid} (" + ", ".join(f"{k} {v:.1f} s" for k, v in done.seconds.items()) + ")",
                  soft_wrap=True)
    if not result.lesions:
        return
    table = Table()
    for column in ("lesion", "voxels", "volume mm³", "slices", "diameter mm", "mean p"):
        table.add_column(column, justify="right")
    for les in result.lesions:
        table.add_row(str(les.id), str(les.voxels), f"{les.volume_mm3:.1f}" if les.volume_mm3 is not None else "-",
                      f"{les.first_slice}-{les.last_slice}", f"{les.diameter_mm:.1f}" if les.diameter_mm is not None else "-",
                      f"{les.mean_probability:.2f}")
    Console().print(table)


@pacs_app.command("list")
@friendly_errors
def pacs_list(url: UrlOpt = None) -> None:
    """The server's studies: patient, date, description, image series, and the model versions with a SEG there."""
    from rich.table import Table

    from brainmets.dicomweb import Pacs

    pacs = Pacs(url)
    studies = pacs.studies()
    table = Table(title=f"{len(studies)} studies at {pacs.url}")
    table.add_column("study UID", no_wrap=True, min_width=max((len(r.uid) for r in studies), default=9))  # copyable
    for column in ("patient", "date", "description", "series", "brainmets SEG"):
        table.add_column(column, overflow="fold")
    for r in studies:
        table.add_row(r.uid, r.patient_id, r.date, r.description, str(r.series), ", ".join(r.brainmets_segs) or "-")
    Console().print(table)


@pacs_app.command("segment")
@friendly_errors
def pacs_segment(
    studies: Annotated[list[str], typer.Argument(help="StudyInstanceUIDs, as `brainmets pacs list` shows them.")],
    url: UrlOpt = None, model: PacsModelOpt = "best", device: DeviceOpt = None, register: RegisterOpt = Register.auto,
) -> None:
    """Fetch each study's MR series (WADO-RS), segment them as one study, store the DICOM SEG (STOW-RS)."""
    from brainmets.dicomweb import Pacs
    from brainmets.pacs import segment_in_pacs

    pacs, predictor = Pacs(url), _pacs_predictor(model, device)
    for uid in studies:
        with console.status(f"study {uid}") as status:
            done = segment_in_pacs(pacs, predictor, uid, progress=lambda step: status.update(f"study {uid}: {step}"),
                                   register=register.value)
        _lesion_table(done)


@pacs_app.command("watch")
@friendly_errors
def pacs_watch(
    url: UrlOpt = None, model: PacsModelOpt = "best",
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls of the server.")] = 10.0,
    once: Annotated[bool, typer.Option(help="Segment what is there now, then stop (e.g. from cron).")] = False,
    state: Annotated[Optional[Path], typer.Option(help="State file (the studies that failed); default: ~/.cache/brainmets/pacs-watch.json.")] = None,
    device: DeviceOpt = None, register: RegisterOpt = Register.auto,
) -> None:
    """Segment every study without a SEG of this model version, each once; Ctrl-C stops. Safe to stop or kill
    and start again: the server says which studies are done, and a SEG stored twice is kept once. The version is
    the model's fingerprint as it runs (weights, post-processing, lesion mode, registration, runtime, precision):
    after a retune every study is segmented again, once."""
    from brainmets.cache import cache_root
    from brainmets.dicomweb import Pacs
    from brainmets.pacs import watch
    from brainmets.provenance import fingerprint

    pacs, predictor = Pacs(url), _pacs_predictor(model, device)
    version = fingerprint(predictor, register=register.value).version
    console.print(f"watching {pacs.url} with {version}" + ("" if once else f", every {interval:g} s"))
    try:
        summary = watch(pacs, predictor, state or cache_root() / "pacs-watch.json", interval, once,
                        say=lambda line: console.print(escape(line), soft_wrap=True), on_segmented=_lesion_table,
                        register=register.value)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    console.print(f"{len(summary.segmented)} studies segmented, {len(summary.failed)} failed")
    if summary.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
