"""`transferbench report`: the numbers in results.csv / report.md / report.html are the runs' own, the study's
references and selection are applied, plots appear only where their axis varies, and the HTML renders."""
import csv
import html
import json
import re
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import make_folder
from transferbench import rundir
from transferbench.config import RunConfig
from transferbench.study import load_study, run_study

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- finished runs with figures we choose

def write_run(cfg: RunConfig, *, test_acc: float, best_val_acc: float, train_time_s: float = 10.0,
              images_per_s: float = 100.0) -> Path:
    """A finished run's record, as `transferbench run` writes it, with the figures given."""
    c = cfg.resolved()
    c.image_size = c.image_size or 32
    run_dir = Path(c.output_dir) / c.name
    zero_shot = c.strategy == "zero-shot"
    history = [{"epoch": 0, "phase": 0, "train_loss": None, "train_acc": None, "val_loss": 2.3, "val_acc": best_val_acc,
                "lr": 0.0, "epoch_time_s": 0.0, "images_per_s": None}] if zero_shot else [
        {"epoch": e, "phase": 0, "train_loss": 1.0 / e, "train_acc": 0.5, "val_loss": 1.0 / e,
         "val_acc": best_val_acc * e / c.epochs, "lr": c.lr, "epoch_time_s": train_time_s / c.epochs,
         "images_per_s": images_per_s} for e in range(1, c.epochs + 1)]
    train_images = c.train_subset or 900
    summary = {"test_acc": test_acc, "test_loss": 1.0, "best_val_acc": best_val_acc, "best_epoch": c.epochs,
               "epochs": c.epochs, "trainable_params": 10, "total_params": 100,
               "train_time_s": 0.0 if zero_shot else train_time_s, "images_per_s": None if zero_shot else images_per_s,
               "peak_memory_mb": 500.0, "model": c.model, "dataset": c.dataset, "strategy": c.strategy, "seed": c.seed,
               "image_size": c.image_size, "num_classes": 10, "device": "cpu", "world_size": 1, "feature_cache": False,
               "augment": c.augment, "train_images": train_images, "val_images": 100, "test_images": 1000,
               "versions": {"python": "3", "torch": "2", "torchvision": "0", "timm": "1"}}
    rundir.atomic_write_json(run_dir / rundir.CONFIG, c.to_dict())
    rundir.atomic_write_jsonl(run_dir / rundir.METRICS, history)
    rundir.atomic_write_json(run_dir / rundir.SUMMARY, summary)
    return run_dir


def fake_study(tmp_path, body: str, figures, name="f"):
    """A study planned from a real study file (study.json as `transferbench study` writes it), every run
    recorded as finished with figures(run) -> write_run's keyword arguments."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    study = load_study(path, tmp_path / "runs")
    rundir.atomic_write_json(study.dir / rundir.STUDY_RECORD, study.record())
    for i, run in enumerate(study.runs):
        write_run(run.config, **figures(run, i))
    return study


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def pm(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


LAYERWISE = """\
options: {dataset: cifar10, model: resnet18, epochs: 2}
grid:
  strategy: [linear-probe, last-n:3, last-n:12]
  seed: [0, 1, 2]
references:
  - {label: "K=12 test", match: {strategy: last-n:12}, value: 70.0, source: "the paper"}
  - {label: "probe validation", match: {strategy: linear-probe}, metric: best_val_acc, value: 50.0}
select: {name: best-K, among: {strategy: [linear-probe, last-n:3, last-n:12]}}
"""
# last-n:3 is best on validation, last-n:12 on test: the answer must be last-n:3's test accuracy.
TEST = {"linear-probe": 0.40, "last-n:3": 0.55, "last-n:12": 0.68}
VAL = {"linear-probe": 0.45, "last-n:3": 0.62, "last-n:12": 0.60}


def layerwise_figures(run, i):
    seed = run.config.seed
    return {"test_acc": TEST[run.config.strategy] + [0.0, 0.012, -0.007][seed],
            "best_val_acc": VAL[run.config.strategy] + [0.0, 0.01, 0.02][seed], "train_time_s": 10.0 + i}


def test_report_numbers_references_and_selection(tmp_path, cli_run):
    study = fake_study(tmp_path, LAYERWISE, layerwise_figures)
    code, out, err = cli_run("report", tmp_path / "runs", "--out", tmp_path / "out")
    assert code == 0, err
    summaries = {r.name: rundir.read_json(r.dir / rundir.SUMMARY) for r in study.runs}

    rows = read_csv(tmp_path / "out" / "results.csv")
    assert len(rows) == 9
    for row in rows:
        s = summaries[row["run"].removeprefix("f/")]
        assert float(row["test_acc"]) == s["test_acc"] and float(row["best_val_acc"]) == s["best_val_acc"]
        assert float(row["train_time_s"]) == s["train_time_s"] and float(row["images_per_s"]) == s["images_per_s"]
        assert row["strategy"] == s["strategy"] and int(row["seed"]) == s["seed"] and row["study"] == "f"
        assert row["dataset_label"] == "CIFAR-10" and row["model"] == "resnet18"

    def of(strategy, metric):
        return [s[metric] for s in summaries.values() if s["strategy"] == strategy]

    md = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    k12, probe_val = of("last-n:12", "test_acc"), of("linear-probe", "best_val_acc")
    k12_row = next(l for l in md.splitlines() if l.startswith("| resnet18 | last-n:12 |"))
    assert f"| {pm(k12)} | 3 | 70.00 | {100 * statistics.fmean(k12) - 70:+.2f} |" in k12_row
    times = [10.0 + i for i, r in enumerate(study.runs) if r.config.strategy == "last-n:12"]
    assert k12_row.endswith(f"| {pm(of('last-n:12', 'best_val_acc')).split(' ±')[0]} | {statistics.fmean(times):.1f} "
                            f"| 100 |")
    probe_row = next(l for l in md.splitlines() if l.startswith("| resnet18 | linear-probe |"))
    assert f"| 50.00 (val) | {100 * statistics.fmean(probe_val) - 50:+.2f} |" in probe_row
    assert f"<td>{pm(k12)}</td>" in page and "<td>70.00</td>" in page

    # Selected on validation (mean over seeds), then tested: last-n:3, and its test accuracy, not last-n:12's.
    answer = f"last-n:3 has the best best_val_acc ({100 * statistics.fmean(of('last-n:3', 'best_val_acc')):.2f}%)"
    assert answer in out and answer in md and html.escape(answer) in page
    assert f"its test_acc: {pm(of('last-n:3', 'test_acc'))}% (mean over 3 seeds)" in md
    assert "| resnet18 | last-n:3 ★ best-K |" in md
    assert "| K=12 test | 70.00 | f |" in md and "the paper" in md


def kinds(out: Path) -> set[str]:
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    found = set(re.findall(r'data-kind="([a-z0-9-]+)"', page))
    kind = (r"-(curves|unfrozen|train-size|shots|resolution|lr|time-to-accuracy|time|confusion-[a-z0-9]+|"
            r"per-class-[a-z0-9]+)\.png")
    assert found == set(re.findall(r"\(report-plots/[\w.-]+?" + kind + r"\)", md))
    files = [p.name for p in (out / "report-plots").glob("*.png")] if (out / "report-plots").exists() else []
    assert sorted(re.search(kind + "$", f).group(1) for f in files) == sorted(found)
    return found


BASE = "options: {dataset: cifar10, model: resnet18, epochs: 1}\n"


@pytest.mark.parametrize("grid,expected", [
    ("grid: {strategy: [full], seed: [0, 1]}", set()),
    ("grid: {strategy: [full]}\nvariants: {long: {epochs: 3}}", {"curves"}),
    ("grid: {strategy: [last-n:3, last-n:12]}", {"unfrozen", "time"}),
    ("grid: {strategy: [zero-shot, linear-probe]}", {"unfrozen"}),
    ("grid: {strategy: [full], image_size: [16, 32]}", {"resolution", "time"}),
    ("grid: {strategy: [full], train_subset: [100, 200]}", {"train-size", "time", "time-to-accuracy"}),
    ("grid: {strategy: [full]}\nvariants: {r18: {}, r34: {model: resnet34}}", {"time"}),
    ("grid: {strategy: [full, linear-probe], lr: [1.0e-4, 1.0e-3]}", {"lr", "time"}),
    ("grid: {strategy: [last-n:3, last-n:12], image_size: [16, 32], train_subset: [100, 200]}\n"
     "variants: {two-epochs: {epochs: 2}}", {"curves", "unfrozen", "resolution", "train-size", "time",
                                             "time-to-accuracy"}),
], ids=["one-configuration", "epochs", "unfrozen", "zero-shot-vs-probe", "resolution", "train-size", "models", "lr",
        "all"])
def test_a_plot_appears_only_when_its_axis_varies(tmp_path, grid, expected):
    from transferbench.report import write_report

    fake_study(tmp_path, BASE + grid + "\n", lambda run, i: {"test_acc": 0.5 + 0.01 * i, "best_val_acc": 0.5,
                                                             "train_time_s": 10.0 + i})
    result = write_report(tmp_path / "runs", tmp_path / "out")
    assert kinds(tmp_path / "out") == expected and result["plots"] == len(expected)


def test_a_sweep_legend_names_each_line_once(tmp_path, monkeypatch):
    """Lines that need every difference to tell them apart (two variants, each sweeping lr with BatchNorm
    statistics frozen and not) are named by variant, strategy and bn_frozen, each once."""
    from transferbench import plots
    from transferbench.report import build_sections, load_runs

    body = BASE + ("grid: {lr: [1.0e-4, 1.0e-3], bn_frozen: [false, true]}\n"
                   "variants: {short: {strategy: last-n:3}, long: {strategy: last-n:12}}\n")
    fake_study(tmp_path, body, lambda run, i: {"test_acc": 0.5 + 0.01 * i, "best_val_acc": 0.5})
    [section] = build_sections(load_runs(tmp_path / "runs"))
    lines, keys = plots._lines(section.groups, "lr")
    assert len(lines) == 4 and keys.count("variant") == 1
    legends = []
    monkeypatch.setattr(plots, "_legend", lambda ax: legends.append(ax.get_legend_handles_labels()[1]))
    assert plots.axis_plot(section.groups, "lr", "t") is not None
    assert sorted(legends[0]) == ["best validation", "long last-n:12 bn frozen no", "long last-n:12 bn frozen yes",
                                  "short last-n:3 bn frozen no", "short last-n:3 bn frozen yes", "test"]


def test_dataset_names_and_runs_outside_studies(tmp_path, folder, cli_run):
    labelled = f"dataset_labels: {{'folder:{folder}': CIFAR-10 (JPEG q75 copy)}}\n"
    body = f"options: {{dataset: 'folder:{folder}', model: resnet18, strategy: full, epochs: 1}}\ngrid: {{seed: [0]}}\n"
    figures = lambda run, i: {"test_acc": 0.5, "best_val_acc": 0.5}  # noqa: E731
    fake_study(tmp_path, body, figures, name="plain")
    fake_study(tmp_path, labelled + body, figures, name="labelled")
    write_run(RunConfig(dataset="cifar100", model="resnet18", strategy="full", epochs=1,
                        output_dir=str(tmp_path / "runs" / "loose")),
              test_acc=0.3, best_val_acc=0.3)
    code, out, err = cli_run("report", tmp_path / "runs")
    assert code == 0, err
    md = (tmp_path / "runs" / "report.md").read_text()  # --out defaults to DIR
    sections = dict(re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", md, flags=re.S | re.M))
    assert set(sections) == {"labelled", "plain", "runs outside any study"}
    assert f"Dataset: imgs (`folder:{folder}`)" in sections["plain"]  # a folder is named by its folder's name
    assert f"Dataset: CIFAR-10 (JPEG q75 copy) (`folder:{folder}`)" in sections["labelled"]
    assert "Dataset: CIFAR-100 (`cifar100`)" in sections["runs outside any study"]
    labels = {r["study"]: r["dataset_label"] for r in read_csv(tmp_path / "runs" / "results.csv")}
    assert labels == {"plain": "imgs", "labelled": "CIFAR-10 (JPEG q75 copy)", "": "CIFAR-100"}

    code, out, err = cli_run("report", tmp_path / "runs", "--dataset-label", f"folder:{folder}=My photos")
    assert code == 0, err
    md = (tmp_path / "runs" / "report.md").read_text()
    assert md.count("Dataset: My photos") == 2


def test_report_errors_name_the_problem(tmp_path, cli_run):
    code, _, err = cli_run("report", tmp_path / "nowhere")
    assert code == 2 and "nowhere is not a directory" in err
    (tmp_path / "empty" / "started").mkdir(parents=True)
    (tmp_path / "empty" / "started" / "config.json").write_text("{}")
    code, _, err = cli_run("report", tmp_path / "empty")
    assert code == 2 and "no finished runs under" in err and "summary.json" in err
    code, _, err = cli_run("report", tmp_path / "empty", "--dataset-label", "no-equals-sign")
    assert code == 2 and "DATASET=LABEL" in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["started"]


def test_rewriting_a_report_replaces_it_whole(tmp_path, cli_run):
    study = fake_study(tmp_path, BASE + "grid: {strategy: [full], image_size: [16, 32]}\n",
                       lambda run, i: {"test_acc": 0.5, "best_val_acc": 0.5, "train_time_s": 1.0 + i})
    assert cli_run("report", tmp_path / "runs")[0] == 0
    assert {p.name.split("-")[-1] for p in (tmp_path / "runs" / "report-plots").iterdir()} == {"resolution.png",
                                                                                               "time.png"}
    shutil.rmtree(study.runs[1].dir)
    (study.runs[1].dir).mkdir()
    (study.runs[1].dir / "config.json").write_text("{}")  # started again, not finished
    code, out, err = cli_run("report", tmp_path / "runs")
    assert code == 0, err
    assert "1 unfinished runs not shown" in out
    assert list((tmp_path / "runs" / "report-plots").iterdir()) == []  # one run left: no axis varies
    assert "1 finished runs" in (tmp_path / "runs" / "report.md").read_text()
    assert "(1 unfinished, not shown)" in (tmp_path / "runs" / "report.md").read_text()
    assert not [p for p in (tmp_path / "runs").rglob("*.tmp")]
    assert len(read_csv(tmp_path / "runs" / "results.csv")) == 1


# ----------------------------------------------------------------------- a real study, in a real browser

@pytest.fixture(scope="module")
def real_report(tmp_path_factory):
    """A tiny study really run (2 strategies x 2 seeds, 2 epochs), and its report."""
    root = tmp_path_factory.mktemp("real")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERBENCH_CACHE", str(root / "cache"))
        folder = make_folder(root / "imgs", train_per_class=8, test_per_class=4, size=8)
        (root / "s.yaml").write_text(f"""\
options: {{dataset: 'folder:{folder}', model: simple_cnn, image_size: 8, batch_size: 8, workers: 1,
          val_fraction: 0.25, epochs: 2}}
grid: {{strategy: [scratch, last-n:4], seed: [0, 1]}}
""")
        study = load_study(root / "s.yaml", root / "runs")
        run_study(study, progress=False)
        from transferbench import cli

        assert cli.main(["report", str(root / "runs"), "--out", str(root / "out")]) == 0
    torch.set_num_threads(threads)
    return study, root / "out"


def test_report_of_real_runs_has_their_numbers(real_report):
    study, out = real_report
    summaries = {r.name: rundir.read_json(r.dir / rundir.SUMMARY) for r in study.runs}
    rows = {r["run"].removeprefix("s/"): r for r in read_csv(out / "results.csv")}
    assert set(rows) == set(summaries)
    for name, s in summaries.items():
        for key in ("test_acc", "best_val_acc", "train_time_s", "images_per_s", "peak_memory_mb"):
            assert float(rows[name][key]) == s[key], key
        assert rows[name]["device_used"] == s["device"] and int(rows[name]["train_images"]) == s["train_images"]
    md = (out / "report.md").read_text()
    for strategy in ("scratch", "last-n:4"):
        tests = [s["test_acc"] for s in summaries.values() if s["strategy"] == strategy]
        row = next(l for l in md.splitlines() if l.startswith(f"| simple_cnn | {strategy} |"))
        assert f"| {pm(tests)} | 2 |" in row
    # the confusion matrix and per-class accuracy of the configuration with the best validation accuracy
    assert kinds(out) == {"curves", "time", "confusion-imgs", "per-class-imgs"}
    assert "top-5 (%)" not in md and "| mean per-class (%) | ECE (%) |" in md  # 3 classes: no top-5


def browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


PROBE = """<script>
addEventListener('load', () => {
  const images = [...document.images];
  const tables = [...document.querySelectorAll('table')];
  const probe = document.createElement('pre');
  probe.id = 'probe';
  probe.textContent = JSON.stringify({
    images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 100 && i.naturalHeight > 100).length,
    shown: images.filter(i => i.getBoundingClientRect().width > 100).length,
    tables: tables.length,
    rows: tables.map(t => t.tBodies[0].rows.length),
    cells: [...document.querySelectorAll('table.results td')].map(td => td.textContent),
    laidOut: tables.every(t => t.getBoundingClientRect().height > 20),
  });
  document.body.appendChild(probe);
});
</script>"""


def test_report_html_renders_in_headless_chromium(real_report, tmp_path):
    exe = browser()
    if exe is None:
        pytest.skip("no Chromium/Chrome installed (.ci/run installs it from the system packages)")
    study, out = real_report
    page = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing to fetch
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    result = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
                             probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, flags=re.S)
    assert found, f"no probe in the dumped DOM (exit {result.returncode}): {result.stderr[-2000:]}"
    probe = json.loads(html.unescape(found.group(1)))
    # learning curves, time, and the best configuration's confusion matrix and per-class accuracy
    assert probe["images"] == 4 and probe["decoded"] == 4 and probe["shown"] == 4
    assert probe["tables"] == 1 and probe["rows"] == [2] and probe["laidOut"]
    summaries = [rundir.read_json(r.dir / rundir.SUMMARY) for r in study.runs]
    scratch = [s["test_acc"] for s in summaries if s["strategy"] == "scratch"]
    assert pm(scratch) in probe["cells"] and "last-n:4" in probe["cells"]
