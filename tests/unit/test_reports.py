"""brainenc report: numbers in tables/*.csv against direct pandas/numpy/scipy computation.

The runs are small synthetic per-voxel tables (brainenc.reports.demo) with NaN
voxels (constant measured responses, constant predictions), tied voxels (the
same r in every model) and several ROIs over 2 subjects.
"""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from brainenc.reports import ReportInputError, build_report, main_report
from brainenc.reports.demo import write_demo_runs
from brainenc.reports.brainmaps import infer_spacing, surface_values, volume_image
from brainenc.metrics.stats import bootstrap_median_ci, pearson_p_one_sided

N_BOOT = 200
N_TEST = 50


def _tie_voxels(run_dirs, n=6):
    """Give voxels 0..n-1 of subject 01 the same r in every run (zero paired differences)."""
    for d in run_dirs:
        path = d / "results" / "voxels.csv"
        df = pd.read_csv(path, dtype={"subject": str})
        m = (df["subject"] == "01") & (df["voxel"] < n)
        df.loc[m, "pearson"] = 0.2
        df.to_csv(path, index=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("reports")
    runs = write_demo_runs(root / "runs", n_voxels=120, n_test=N_TEST, seed=1)
    _tie_voxels(runs)
    out = root / "out"
    code = main_report([*map(str, runs), "--out", str(out), "--n-boot", str(N_BOOT), "--no-brainmaps"])
    assert code == 0
    raw = pd.concat([pd.read_csv(d / "results" / "voxels.csv", dtype={"subject": str}) for d in runs],
                    ignore_index=True)
    raw["label"] = raw["model"]  # model names are unique here
    return {"runs": runs, "out": out, "raw": raw,
            "summary": pd.read_csv(out / "tables" / "roi_summary.csv", dtype={"subject": str}),
            "paired": pd.read_csv(out / "tables" / "paired.csv", dtype={"subject": str})}


def _cell(raw: pd.DataFrame, label, dataset, subject, roi) -> pd.DataFrame:
    d = raw[(raw["label"] == label) & (raw["dataset"] == dataset)]
    if subject != "all":
        d = d[d["subject"] == subject]
    if roi != "all":
        d = d[d["roi"] == roi]
    return d


def test_summary_has_every_cell(report):
    s, raw = report["summary"], report["raw"]
    rois = set(raw["roi"]) | {"all"}
    for label in raw["label"].unique():
        got = s[s["label"] == label]
        assert set(got["subject"]) == {"01", "02", "all"}
        for subject in ("01", "02", "all"):
            assert set(got.loc[got["subject"] == subject, "roi"]) == rois


def test_rois_are_listed_in_the_atlas_order(report):
    """roi_summary.csv and paired.csv list each cell's ROIs as the store's atlas numbers them
    (summary.json roi_order: V1, V2, V3, hV4, FFA), then unlabelled voxels, then the pooled row;
    not alphabetically (FFA first)."""
    want = ["V1", "V2", "V3", "hV4", "FFA", "none", "all"]
    for name in ("summary", "paired"):
        df = report[name]
        keys = ["label", "dataset", "subject"] if name == "summary" else ["model_a", "model_b", "dataset", "subject"]
        for _, g in df.groupby(keys, sort=False):
            assert list(g["roi"]) == [r for r in want if r in set(g["roi"])], (name, list(g["roi"]))
    md = (report["out"] / "report.md").read_text()
    first = md.index("| V1 ")
    assert first < md.index("| hV4 ", first) < md.index("| FFA ", first) < md.index("| none ", first)


def test_summary_medians_means_counts(report):
    s, raw = report["summary"], report["raw"]
    assert len(s) > 0
    for row in s.itertuples():
        d = _cell(raw, row.label, row.dataset, row.subject, row.roi)
        r = d["pearson"].to_numpy()
        ok = np.isfinite(r)
        assert row.n_voxels == len(d)
        assert row.n_valid == ok.sum() and row.n_nan == (~ok).sum()
        assert row.median_pearson == pytest.approx(np.nanmedian(r), abs=1e-12)
        assert row.mean_pearson == pytest.approx(np.nanmean(r), abs=1e-12)
        assert row.median_normalised == pytest.approx(d["normalised"].median(skipna=True), abs=1e-9)
        assert row.median_noise_ceiling == pytest.approx(d["noise_ceiling"].median(), abs=1e-9)
        frac = (d["pearson"] / d["oracle"])[d["oracle"] > 0.1]
        assert row.median_frac_oracle == pytest.approx(frac.median(), abs=1e-12, nan_ok=True)
    # The demo has NaN voxels, so the NaN handling was exercised.
    assert (s["n_nan"] > 0).any()


def test_significance_fractions(report):
    s, raw = report["summary"], report["raw"]
    for row in s.itertuples():
        d = _cell(raw, row.label, row.dataset, row.subject, row.roi)
        r = d["pearson"].dropna().to_numpy()
        t = r * np.sqrt((N_TEST - 2) / (1 - r**2))
        p = stats.t.sf(t, N_TEST - 2)
        assert row.frac_sig == pytest.approx(np.mean(p < 0.05), abs=1e-12)
        assert row.n_test == N_TEST


def test_fdr_fraction_matches_scipy(report):
    s, raw = report["summary"], report["raw"]
    for (label, subject), d in raw.groupby(["label", "subject"]):
        d = d.dropna(subset=["pearson"])
        p = pearson_p_one_sided(d["pearson"].to_numpy(), np.full(len(d), N_TEST))
        rej = stats.false_discovery_control(p, method="bh") <= 0.05
        row = s[(s["label"] == label) & (s["subject"] == subject) & (s["roi"] == "all")].iloc[0]
        assert row.frac_sig_fdr == pytest.approx(rej.mean(), abs=1e-12)
        # FDR can only remove discoveries.
        assert row.frac_sig_fdr <= row.frac_sig


def test_one_sided_pearson_p_matches_scipy_pearsonr():
    rng = np.random.default_rng(0)
    for n in (5, 30, 200):
        x = rng.normal(size=(20, n))
        y = 0.3 * x + rng.normal(size=(20, n))
        ref = [stats.pearsonr(a, b, alternative="greater") for a, b in zip(x, y)]
        r = np.array([v.statistic for v in ref])
        got = pearson_p_one_sided(r, np.full(20, n))
        np.testing.assert_allclose(got, [v.pvalue for v in ref], rtol=1e-7, atol=1e-12)
    assert np.isnan(pearson_p_one_sided(np.array([np.nan]), np.array([10]))).all()
    assert np.isnan(pearson_p_one_sided(np.array([0.5]), np.array([np.nan]))).all()


def test_bootstrap_ci_brackets_median_and_is_seeded(report, tmp_path):
    s = report["summary"]
    big = s[s["n_valid"] >= 10]
    assert (big["median_pearson_ci_low"] <= big["median_pearson"]).all()
    assert (big["median_pearson"] <= big["median_pearson_ci_high"]).all()
    assert (big["median_pearson_ci_low"] < big["median_pearson_ci_high"]).all()
    # Pooled cells against scipy's percentile bootstrap (different draws: loose tolerance).
    raw = report["raw"]
    for row in s[(s["subject"] == "all") & (s["roi"] == "all")].itertuples():
        r = _cell(raw, row.label, row.dataset, "all", "all")["pearson"].dropna().to_numpy()
        ref = stats.bootstrap((r,), np.median, n_resamples=2000, method="percentile",
                              rng=np.random.default_rng(0)).confidence_interval
        assert row.median_pearson_ci_low == pytest.approx(ref.low, abs=0.02)
        assert row.median_pearson_ci_high == pytest.approx(ref.high, abs=0.02)
    # Same seed -> identical tables; another seed -> other CIs, same point estimates.
    again = tmp_path / "again"
    build_report(report["runs"], again, n_boot=N_BOOT, seed=0, figures=False)
    pd.testing.assert_frame_equal(pd.read_csv(again / "tables" / "roi_summary.csv", dtype={"subject": str}), s)
    other = tmp_path / "other"
    build_report(report["runs"], other, n_boot=N_BOOT, seed=7, figures=False)
    o = pd.read_csv(other / "tables" / "roi_summary.csv", dtype={"subject": str})
    np.testing.assert_array_equal(o["median_pearson"], s["median_pearson"])
    assert not np.allclose(o["median_pearson_ci_low"], s["median_pearson_ci_low"])


def test_bootstrap_median_ci_equals_naive_resampling():
    # The sorted-index shortcut must give the medians of plain x[idx] resamples.
    for n in (7, 8):
        x = np.random.default_rng(3).normal(size=n)
        lo, hi = bootstrap_median_ci(x, 500, np.random.default_rng(11))
        idx = np.random.default_rng(11).integers(0, n, size=(500, n), dtype=np.int32)
        meds = np.median(np.sort(x)[idx], axis=1)
        assert (lo, hi) == pytest.approx(tuple(np.percentile(meds, [2.5, 97.5])))


def test_paired_comparisons_match_scipy_wilcoxon(report):
    p, raw = report["paired"], report["raw"]
    # A before B in the order the run directories were given (afo, universal, ridge).
    assert list(dict.fromkeys(zip(p["model_a"], p["model_b"]))) == [
        ("afo", "universal"), ("afo", "ridge"), ("universal", "ridge")]
    key = ["dataset", "subject", "voxel"]
    for row in p.itertuples():
        a = raw.loc[raw["label"] == row.model_a, key + ["roi", "pearson"]]
        b = raw.loc[raw["label"] == row.model_b, key + ["pearson"]]
        m = a.merge(b, on=key, suffixes=("_a", "_b")).dropna(subset=["pearson_a", "pearson_b"])
        if row.subject != "all":
            m = m[m["subject"] == row.subject]
        if row.roi != "all":
            m = m[m["roi"] == row.roi]
        d = (m["pearson_a"] - m["pearson_b"]).to_numpy()
        assert row.n_pairs == len(d)
        assert row.median_diff == pytest.approx(np.median(d), abs=1e-12)
        assert row.mean_diff == pytest.approx(d.mean(), abs=1e-12)
        assert row.win_frac_a == pytest.approx(np.mean(d > 0) + 0.5 * np.mean(d == 0), abs=1e-12)
        ref = stats.wilcoxon(d)
        assert row.wilcoxon_p == pytest.approx(ref.pvalue, rel=1e-10)
        assert row.wilcoxon_stat == pytest.approx(ref.statistic, rel=1e-10)
    # Tied voxels exist, so the ties' half-win convention was exercised.
    sub01 = p[(p["subject"] == "01") & (p["roi"] == "all")]
    assert (sub01["n_pairs"] > 0).all()


def test_retrieval_table(report):
    ret = pd.read_csv(report["out"] / "tables" / "retrieval.csv", dtype={"subject": str})
    for d in report["runs"]:
        summ = json.loads((d / "results" / "summary.json").read_text())
        for key, vals in summ["retrieval"].items():
            row = ret[(ret["run"] == summ["run"]) & (ret["key"] == key)]
            assert len(row) == 1
            for f in ("top1", "top5", "chance_top1", "chance_top5", "n_images"):
                assert row[f].iloc[0] == pytest.approx(vals[f])


def test_markdown_and_self_contained_html(report):
    out = report["out"]
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    figures = sorted((out / "figures").glob("*.png"))
    # 1 dataset: 2 bar charts, 1 histogram, 3 model pairs -> 3 scatters
    assert len(figures) == 6
    for f in figures:
        assert f"figures/{f.name}" in md
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower()
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == len(figures)
    for tag in imgs:
        m = re.search(r'src="data:image/png;base64,([^"]+)"', tag)
        assert m, tag[:80]
        assert base64.b64decode(m.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    for label in report["raw"]["label"].unique():
        assert label in md and label in html


def test_missing_column_is_a_clear_error(tmp_path, capsys):
    runs = write_demo_runs(tmp_path / "runs", models=("a", "b"), n_voxels=20, retrieval=False)
    path = runs[1] / "results" / "voxels.csv"
    pd.read_csv(path).drop(columns=["noise_ceiling"]).to_csv(path, index=False)
    with pytest.raises(ReportInputError) as err:
        build_report(runs, tmp_path / "out", n_boot=10, brainmaps=False)
    msg = str(err.value)
    assert str(path) in msg and "'noise_ceiling'" in msg and "percent" in msg
    assert main_report([*map(str, runs), "--out", str(tmp_path / "out")]) == 2
    assert "noise_ceiling" in capsys.readouterr().err


def test_missing_file_and_bad_values_are_clear_errors(tmp_path):
    runs = write_demo_runs(tmp_path / "runs", models=("a", "b"), n_voxels=20, retrieval=False)
    (runs[0] / "results" / "voxels.csv").unlink()
    with pytest.raises(ReportInputError, match=r"voxels\.csv: file not found"):
        build_report(runs, tmp_path / "out", n_boot=10, brainmaps=False)
    path = runs[1] / "results" / "voxels.csv"
    df = pd.read_csv(path)
    df["pearson"] = df["pearson"].astype(object)
    df.loc[3, "pearson"] = "oops"
    df.to_csv(path, index=False)
    with pytest.raises(ReportInputError, match=r"column 'pearson' must be numeric; row 5 holds 'oops'"):
        build_report([runs[1]], tmp_path / "out", n_boot=10, brainmaps=False)


def test_n_test_from_summary_or_absent(tmp_path):
    col = write_demo_runs(tmp_path / "col", models=("a", "b"), n_voxels=60, n_test_in="column")
    summ = write_demo_runs(tmp_path / "summ", models=("a", "b"), n_voxels=60, n_test_in="summary")
    none = write_demo_runs(tmp_path / "none", models=("a", "b"), n_voxels=60, n_test_in="none")
    tabs = {}
    for name, runs in (("col", col), ("summ", summ), ("none", none)):
        build_report(runs, tmp_path / f"out_{name}", n_boot=0, figures=False)
        tabs[name] = pd.read_csv(tmp_path / f"out_{name}" / "tables" / "roi_summary.csv")
    np.testing.assert_array_equal(tabs["col"]["frac_sig"], tabs["summ"]["frac_sig"])
    assert tabs["col"]["frac_sig"].notna().all()
    assert tabs["none"]["frac_sig"].isna().all()
    assert "no test-set size" in (tmp_path / "out_none" / "report.md").read_text()
    # n_boot=0 disables CIs rather than inventing them.
    assert tabs["col"]["median_pearson_ci_low"].isna().all()


def test_shared_model_name_is_disambiguated_by_run(tmp_path):
    runs = write_demo_runs(tmp_path / "runs", models=("afo", "afo", "ridge"), n_voxels=30)
    build_report(runs, tmp_path / "out", n_boot=0, figures=False)
    s = pd.read_csv(tmp_path / "out" / "tables" / "roi_summary.csv")
    assert set(s["label"]) == {"afo [run_0_afo]", "afo [run_1_afo]", "ridge"}
    p = pd.read_csv(tmp_path / "out" / "tables" / "paired.csv")
    assert ((p["model_a"] == "afo [run_0_afo]") & (p["model_b"] == "afo [run_1_afo]")).any()


def test_brain_maps_and_failures_degrade_to_notes(tmp_path):
    runs = write_demo_runs(tmp_path / "runs", models=("a", "b"), subjects=("01",),
                           datasets=("simbrain", "mnidata", "surfdata"), n_voxels=60)
    # Move one dataset's coordinates off any fsaverage mesh: its map must become a note.
    for d in runs:
        path = d / "results" / "voxels.csv"
        df = pd.read_csv(path, dtype={"subject": str})
        df.loc[df["dataset"] == "surfdata", ["x", "y", "z"]] += 500.0
        df.to_csv(path, index=False)
    html = build_report(runs, tmp_path / "out", n_boot=0, max_pairs=1)
    figs = {f.name for f in (tmp_path / "out" / "figures").glob("brainmap_*.png")}
    assert figs == {"brainmap_simbrain_01.png", "brainmap_mnidata_01.png"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "brain map for surfdata subject 01 skipped" in md
    assert "not on an fsaverage mesh" in md
    assert html.read_text().count("<img") == len(list((tmp_path / "out" / "figures").glob("*.png")))


def test_surface_mapping_by_coordinates_and_by_vertex_index():
    from nilearn import datasets

    fs = datasets.load_fsaverage("fsaverage5")
    verts = np.array([0, 17, 5000, 10241])
    df = pd.DataFrame(fs["pial"].parts["right"].coordinates[verts], columns=["x", "y", "z"])
    df["hemi"] = "rh"
    df["pearson"] = [0.1, 0.2, np.nan, 0.4]
    vals, how = surface_values(df)
    assert "pial" in how
    np.testing.assert_array_equal(vals["right"][verts], df["pearson"].to_numpy())
    assert np.isnan(vals["left"]).all() and np.isfinite(vals["right"]).sum() == 3
    # fsaverage7-style vertex indices: only the ones shared with fsaverage5 are kept.
    df["vertex"] = [3, 10241, 10242, 160000]
    vals, how = surface_values(df)
    assert "2 of 4" in how
    assert vals["right"][3] == 0.1 and vals["right"][10241] == 0.2
    assert np.isfinite(vals["right"]).sum() == 2


def test_native_volume_grid():
    rng = np.random.default_rng(0)
    ijk = rng.choice(10 * 10 * 10, size=50, replace=False)
    ijk = np.stack(np.unravel_index(ijk, (10, 10, 10)), axis=1)
    coords = ijk * 1.8 + np.array([-30.0, -80.0, 5.0])
    vals = rng.uniform(0.1, 0.9, 50)
    np.testing.assert_allclose(infer_spacing(coords), 1.8)
    # Off-grid (continuous) coordinates fall back to the 1.8 mm default instead of a tiny step.
    np.testing.assert_allclose(infer_spacing(rng.normal(0, 10, size=(300, 3))), 1.8)
    img, cov, n_out = volume_image(coords, vals, "func1pt8mm")
    data = np.asarray(img.dataobj)
    inv = np.linalg.inv(img.affine)
    back = np.rint(coords @ inv[:3, :3].T + inv[:3, 3]).astype(int)
    np.testing.assert_allclose(data[tuple(back.T)], vals, rtol=1e-6)
    assert n_out == 0 and np.asarray(cov.dataobj).sum() == 50
    img, cov, n_out = volume_image(np.array([[0.0, 0.0, 0.0], [500.0, 0, 0]]), np.array([1.0, 2.0]), "MNI152")
    assert n_out == 1 and np.asarray(img.dataobj).max() == 1.0


def test_flat_brain_maps_show_each_model_on_a_sequential_scale_and_each_pair_difference():
    from brainenc.reports.brainmaps import brainmap_figure, flat_differences

    rng = np.random.default_rng(0)
    n = 400
    base = pd.DataFrame({"dataset": "simbrain7t", "subject": "subj01", "voxel": np.arange(n),
                         "roi": np.where(np.arange(n) < 100, "V1", "none"), "space": "simbrain",
                         "x": rng.normal(size=n), "y": rng.normal(size=n), "z": 0.0,
                         "flat_x": rng.uniform(-40, 40, n), "flat_y": rng.uniform(-30, 30, n)})
    models = {lab: base.assign(label=lab, pearson=rng.uniform(-0.1, 0.8, n)) for lab in ("a", "b", "c")}
    models["b"].loc[5, "pearson"] = np.nan
    df = pd.concat(models.values(), ignore_index=True).sample(frac=1, random_state=0)  # rows unordered
    diffs = flat_differences(df, ["a", "b", "c"])
    assert [(a, b) for a, b, _ in diffs] == [("a", "b"), ("a", "c"), ("b", "c")]
    ab = diffs[0][2].set_index("voxel")["pearson"].sort_index()
    expected = models["a"]["pearson"].to_numpy() - models["b"]["pearson"].to_numpy()
    np.testing.assert_allclose(ab.to_numpy(), expected)  # aligned by voxel, NaN kept
    fig, notes = brainmap_figure(df, ["a", "b", "c"], "pearson", vmax=0.7)
    panels = [ax for ax in fig.axes if ax.get_title()]  # not the colour bars
    assert [ax.get_title() for ax in panels] == ["a", "b", "c", "a − b", "a − c", "b − c"]
    cmaps = [ax.collections[-1].get_cmap().name for ax in panels]
    assert cmaps == ["viridis"] * 3 + ["RdBu_r"] * 3
    assert panels[0].collections[-1].get_clim() == (0.0, 0.7)
    lo, hi = panels[3].collections[-1].get_clim()
    assert -lo == hi > 0
    assert min(panels[0].collections[-1].get_sizes()) >= 6  # readable dots, not specks
    assert any("difference" in n for n in notes)


def test_embedding_section_from_clustered_runs_only(tmp_path):
    """A run clustered by brainenc.analysis.embeddings gets its ARI, NN-same-ROI fraction and
    2-D embedding figure in the report; a run without clusters.json adds nothing."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = write_demo_runs(tmp_path / "runs", models=("universal", "ridge"), n_voxels=30)
    res = runs[0] / "results"
    (res / "clusters.json").write_text(json.dumps(
        {"method": "kmeans", "n_clusters": 7, "ari": {"pooled": {"ari": 0.271, "ari_signal": 0.254}},
         "nn_same_roi": {"k": 10, "fraction": 0.763},
         "type_information": {"embeddings": {"pooled": {"ari": 0.658}}, "responses": {"pooled": {"ari": 0.644}}}}))
    fig = plt.figure(figsize=(2, 2))
    fig.savefig(res / "embeddings_2d.png")
    plt.close(fig)
    html = build_report(runs, tmp_path / "out", n_boot=0, brainmaps=False)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Embeddings" in md and "0.763" in md and "0.271" in md
    assert "ARI supervised, responses" in md and "0.644" in md and "0.658" in md
    emb = list((tmp_path / "out" / "figures").glob("embeddings_*.png"))
    assert len(emb) == 1 and emb[0].read_bytes() == (res / "embeddings_2d.png").read_bytes()
    assert html.read_text().count("<img") == len(list((tmp_path / "out" / "figures").glob("*.png")))
    build_report(runs[1:], tmp_path / "out2", n_boot=0, figures=False)
    assert "## Embeddings" not in (tmp_path / "out2" / "report.md").read_text()


def test_runs_that_form_a_grid_get_a_run_by_model_table_and_heat_map(tmp_path):
    """A sweep's layout (the same encoders under several backbone runs, one backbone failed for
    one encoder) gives tables/grid_<dataset>.csv equal to the per-cell medians of r / oracle."""
    runs = write_demo_runs(tmp_path / "runs", models=("ridge", "ridge", "retino", "retino", "retino"),
                           subjects=("01",), n_voxels=80)
    backbones = ["lite1", "lite0", "lite1", "lite0", "vit"]  # not alphabetical: rows keep this order
    raw = []
    for d, bb in zip(runs, backbones):
        path = d / "results" / "voxels.csv"
        df = pd.read_csv(path, dtype={"subject": str})
        df["run"] = bb
        df["oracle"] = np.where(df["voxel"] % 5 == 0, 0.05, 0.8)  # oracle <= 0.1: left out
        df.to_csv(path, index=False)
        raw.append(df)
    build_report(runs, tmp_path / "out", n_boot=0, brainmaps=False)
    grid = pd.read_csv(tmp_path / "out" / "tables" / "grid_simbrain.csv")
    assert list(grid["run"]) == ["lite1", "lite0", "vit"]
    raw = pd.concat(raw)
    for (bb, model), g in raw.groupby(["run", "model"]):
        for roi, gr in g.groupby("roi"):
            if roi == "none":
                continue
            keep = gr["oracle"] > 0.1
            want = np.nanmedian(gr["pearson"][keep] / gr["oracle"][keep])
            got = grid.loc[grid["run"] == bb, f"{model} {roi}"].item()
            assert got == pytest.approx(want, abs=1e-9), (bb, model, roi)
    assert grid.loc[grid["run"] == "vit", [c for c in grid if c.startswith("ridge ")]].isna().all(axis=None)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "runs x models" in md and "figures/grid_simbrain.png" in md
    assert (tmp_path / "out" / "figures" / "grid_simbrain.png").stat().st_size > 5000
    # ROIs in the store's atlas order (summary.json roi_order), in the table and the heat map
    assert [c.split(" ", 1)[1] for c in grid.columns[1:]][:5] == ["V1", "V2", "V3", "hV4", "FFA"]
    from brainenc.reports import plots, tables
    from brainenc.results import read_run, roi_order

    read = tables.assign_labels([read_run(d) for d in runs])
    tables.attach_n_test(read)
    summary = tables.roi_summary(tables.concat_runs(read), n_boot=0, order=roi_order(read))
    fig = plots.grid_heatmap(plots.grid_table(summary, "median_frac_oracle", order=roi_order(read)), "r / oracle")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["V1", "V2", "V3", "hV4", "FFA", "all"]


def test_runs_that_do_not_form_a_grid_get_no_grid(tmp_path):
    runs = write_demo_runs(tmp_path / "runs", models=("ridge", "retino"), subjects=("01",), n_voxels=40)
    build_report(runs, tmp_path / "out", n_boot=0, figures=False)
    assert not (tmp_path / "out" / "tables" / "grid_simbrain.csv").exists()
