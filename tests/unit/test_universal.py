"""UniversalReadout: attention shapes and masking, global voxel indexing, chunked evaluation,
new-pair embeddings, clustering helpers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from brainenc.analysis.embedding_space import ari_table, cluster_embeddings
from brainenc.lit.encoder_module import EncoderModule
from brainenc.models.backbones import Backbone, Features
from brainenc.models.readout import FeatureSpec
from brainenc.models.universal import UniversalReadout, VoxelCrossAttention, level_tokens

# deliberately listed out of sorted order: the global layout must not depend on it
COUNTS = {"dsB/subj01": 7, "dsA/subj02": 5, "dsA/subj01": 11}
SPEC = FeatureSpec(shapes=((6, 4, 4), (10, 2, 2)), pooled_dim=16, has_cls=False)


def _features(b: int = 3, seed: int = 0, cls: bool = False) -> Features:
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(b, c, h, w, generator=g) for c, h, w in SPEC.shapes]
    tokens = [torch.randn(b, c, generator=g) for c, _, _ in SPEC.shapes] if cls else None
    return Features(maps, tokens)


def _readout(**kw) -> UniversalReadout:
    torch.manual_seed(0)
    r = UniversalReadout(COUNTS, SPEC, embed_dim=12, width=8, **kw)
    # non-trivial readout maps (feat_embed starts small) so that predictions differ per voxel
    with torch.no_grad():
        r.feat_embed.normal_()
        r.bias_embed.normal_()
    return r.eval()


# ----------------------------------------------------------------------------- attention
def test_attention_shapes():
    att = VoxelCrossAttention(in_dim=6, n_tokens=17, width=8, embed_dim=12).eval()
    k, v = att.tokens(torch.randn(3, 17, 6))
    assert k.shape == v.shape == (3, 17, 8)
    h, a = att(torch.randn(5, 12), k, v, return_attention=True)
    assert h.shape == (3, 5, 8) and a.shape == (3, 5, 17)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 5))


def test_masked_tokens_get_zero_weight_and_do_not_matter():
    torch.manual_seed(1)
    att = VoxelCrossAttention(in_dim=6, n_tokens=9, width=8, embed_dim=12).eval()
    tokens = torch.randn(2, 9, 6)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True   # image 0: last three tokens are padding
    mask[1, 2] = True
    q = torch.randn(4, 12)
    h, a = att(q, *att.tokens(tokens), key_padding_mask=mask, return_attention=True)
    assert torch.all(a[0, :, 6:] == 0) and torch.all(a[1, :, 2] == 0)
    assert torch.all(a[~mask[:, None, :].expand_as(a)] > 0)
    changed = tokens.clone()
    changed[mask] = torch.randn(int(mask.sum()), 6) * 100
    fused = att(q, *att.tokens(tokens), key_padding_mask=mask)  # the fused kernel used in training
    torch.testing.assert_close(fused, h, rtol=1e-6, atol=1e-6)   # equals the explicit weights' path
    h2 = att(q, *att.tokens(changed), key_padding_mask=mask)
    torch.testing.assert_close(h2, fused, rtol=0, atol=0)
    # and without the mask the same change does matter (the check above can fail)
    assert not torch.allclose(att(q, *att.tokens(tokens)), att(q, *att.tokens(changed)))
    with pytest.raises(ValueError, match="every token masked"):
        att(q, *att.tokens(tokens), key_padding_mask=torch.ones(2, 9, dtype=torch.bool))


def test_level_tokens_cnn_global_and_vit_cls():
    fmap = torch.randn(2, 6, 4, 4)
    t = level_tokens(fmap, None)
    assert t.shape == (2, 17, 6)
    torch.testing.assert_close(t[:, 0], fmap.mean(dim=(2, 3)))     # pooled "global" token
    torch.testing.assert_close(t[:, 1:], fmap.flatten(2).transpose(1, 2))
    cls = torch.randn(2, 6)
    assert torch.equal(level_tokens(fmap, cls)[:, 0], cls)         # class token first
    assert level_tokens(torch.randn(2, 6, 8, 8), None, max_grid=4).shape == (2, 17, 6)


# ----------------------------------------------------------------------------- indexing
def test_global_indexing_offsets_sorted_pairs():
    r = _readout()
    assert r.pairs == ["dsA/subj01", "dsA/subj02", "dsB/subj01"]
    assert r.offsets == {"dsA/subj01": 0, "dsA/subj02": 11, "dsB/subj01": 16}
    assert r.n_total == 23 and r.embedding.shape == (23, 12)
    assert torch.equal(r.global_index("dsB/subj01", torch.tensor([0, 6])), torch.tensor([16, 22]))
    # each pair owns distinct rows
    rows = torch.cat([r.global_index(p) for p in r.pairs])
    assert torch.equal(torch.sort(rows).values, torch.arange(23))
    e = {p: r.embeddings(p) for p in r.pairs}
    assert not torch.allclose(e["dsA/subj02"][:5], e["dsA/subj01"][:5])
    assert torch.equal(r.voxel_weights("dsA/subj02"), r.embedding[11:16])


def test_voxel_subset_picks_the_right_rows():
    r = _readout()
    f = _features()
    for pair in r.pairs:
        full = r(f, pair)
        assert full.shape == (3, COUNTS[pair])
        sub = torch.tensor([COUNTS[pair] - 1, 0, 2])
        torch.testing.assert_close(r(f, pair, sub), full[:, sub])
    # a change to one pair's embeddings leaves the other pairs' predictions alone
    before = r(f, "dsB/subj01")
    with torch.no_grad():
        r.embedding[r.global_index("dsA/subj01")] += 1.0
    torch.testing.assert_close(r(f, "dsB/subj01"), before)


def test_gradient_reaches_only_sampled_rows():
    r = _readout().train()
    sub = torch.tensor([1, 4])
    r(_features(), "dsA/subj02", sub).pow(2).sum().backward()
    touched = torch.nonzero(r.embedding.grad.abs().sum(1)).flatten()
    assert torch.equal(touched, torch.tensor([12, 15]))


def test_vit_class_tokens():
    f = _features(cls=True)
    spec = FeatureSpec(SPEC.shapes, 32, True)
    r = UniversalReadout(COUNTS, spec, embed_dim=12, width=8).eval()
    with torch.no_grad():
        r.feat_embed.normal_()
    out = r(f, "dsA/subj01")
    f2 = Features(f.maps, [torch.flip(c, dims=[1]) for c in f.cls])
    assert out.shape == (3, 11) and not torch.allclose(out, r(f2, "dsA/subj01"))


def test_add_pair_new_table():
    r = _readout()
    init = torch.randn(4, 12)
    p = r.add_pair("dsC/subj09", 4, init)
    assert r.has_pair("dsC/subj09") and r.n_voxels("dsC/subj09") == 4
    assert torch.equal(r.embeddings("dsC/subj09"), init) and p.requires_grad
    assert r(_features(), "dsC/subj09").shape == (3, 4)
    with pytest.raises(ValueError, match="already"):
        r.add_pair("dsA/subj01", 11)
    with pytest.raises(ValueError, match="init must be"):
        r.add_pair("dsD/subj01", 3, torch.zeros(2, 12))
    with pytest.raises(KeyError, match="unknown pair"):
        r.embeddings("nope/subj01")


# ----------------------------------------------------------------------------- chunked evaluation
@pytest.mark.parametrize("chunk", [4, 7, 1000])
def test_chunked_evaluation_equals_unchunked(chunk):
    torch.manual_seed(0)
    bb = Backbone("test_efficientnet", image_size=32)
    counts = {"dsA/subj01": 23, "dsB/subj01": 9}
    m = EncoderModule(backbone=bb, voxel_counts=counts, eval_voxel_chunk=chunk,
                      readout=lambda c, s: UniversalReadout(c, s, embed_dim=16, width=8, max_grid=2)).eval()
    with torch.no_grad():
        m.readout.feat_embed.normal_()
        feats = m.backbone(torch.rand(4, 3, 32, 32))
        for pair in counts:
            torch.testing.assert_close(m.predict_all(feats, pair), m.readout(feats, pair), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- clustering
def test_clustering_recovers_separated_groups_and_ari():
    rng = np.random.default_rng(0)
    truth = np.repeat([0, 1, 2], 40)
    emb = rng.normal(size=(120, 16)) * 0.1 + np.eye(16)[truth] * 3
    for method in ("kmeans", "gmm"):
        lab = cluster_embeddings(emb, 3, method)
        res = ari_table({"a/s": lab[:60], "b/s": lab[60:]}, {"a/s": truth[:60], "b/s": truth[60:]},
                        {"a/s": truth[:60] != 0, "b/s": truth[60:] != 0})
        assert res["pooled"]["ari"] == pytest.approx(1.0)
        assert res["a/s"]["ari_signal"] == pytest.approx(1.0)
    shuffled = ari_table({"a/s": rng.permutation(truth)}, {"a/s": truth})
    assert abs(shuffled["a/s"]["ari"]) < 0.1


def test_add_column_sets_labels_by_pair_and_voxel_atomically(tmp_path):
    from brainenc.reports.demo import write_demo_runs
    from brainenc.results import add_column, read_results

    run = write_demo_runs(tmp_path / "runs", models=("universal",), subjects=("01", "02"), n_voxels=12)[0]
    before = read_results(run)
    labels = {"simbrain/01": np.arange(12) % 5}  # subject 02 gets no labels
    add_column(run, "cluster", labels)
    after = read_results(run)
    assert after["subject"].tolist() == before["subject"].tolist() and set(after["subject"]) == {"01", "02"}
    one = after[after["subject"] == "01"]
    assert (one["cluster"].to_numpy() == labels["simbrain/01"][one["voxel"].to_numpy()]).all()
    assert after.loc[after["subject"] == "02", "cluster"].isna().all()
    np.testing.assert_array_equal(after["pearson"], before["pearson"])
    assert sorted(x.name for x in (run / "results").iterdir()) == ["summary.json", "voxels.csv"]


# ----------------------------------------------------------------------------- transfer initialisation
def test_coords_and_neighbour_init_copy_neighbours():
    from brainenc.recipes.transfer import coords_init, neighbour_init

    r = _readout()
    ref_xyz = {"dsA/subj01": np.arange(33, dtype=float).reshape(11, 3), "dsA/subj02": 100 + np.zeros((5, 3))}
    ref_xyz["dsA/subj02"][:, 0] += np.arange(5)
    new_xyz = ref_xyz["dsA/subj01"][[3, 7]] + 0.1
    init = coords_init(r, new_xyz, ref_xyz, k=1)
    torch.testing.assert_close(init, r.embeddings("dsA/subj01")[[3, 7]])
    # k = 2 averages the two nearest (voxels 2 and 3 of subj02 around x = 102.5)
    two = coords_init(r, np.array([[102.5, 100, 100]]), ref_xyz, k=2)
    torch.testing.assert_close(two[0], r.embeddings("dsA/subj02")[[2, 3]].mean(0))
    # neighbours in embedding space: a scaled copy of a base row finds that row (cosine)
    e = r.embedding.detach()
    torch.testing.assert_close(neighbour_init(r, e[[5, 20]] * 3.0, k=1), e[[5, 20]])


# ----------------------------------------------------------------------------- keys/values once per batch
def test_prepared_keys_values_give_the_uncached_predictions():
    r = _readout()
    f = _features()
    kv = r.prepare(f)
    assert len(kv) == len(SPEC.shapes) and kv[0][0].shape == (3, 17, 8)
    assert r.prepare(kv) is kv  # already prepared: nothing recomputed
    for pair in r.pairs:
        sub = torch.tensor([0, COUNTS[pair] - 1])
        assert torch.equal(r(kv, pair, sub), r(f, pair, sub))
        assert torch.equal(r(kv, pair), r(f, pair))


def test_predict_all_computes_keys_values_once_per_batch(monkeypatch):
    torch.manual_seed(0)
    bb = Backbone("test_efficientnet", image_size=32)
    m = EncoderModule(backbone=bb, voxel_counts={"dsA/subj01": 23}, eval_voxel_chunk=4,
                      readout=lambda c, s: UniversalReadout(c, s, embed_dim=16, width=8, max_grid=2)).eval()
    calls = []
    original = m.readout.level_features
    monkeypatch.setattr(m.readout, "level_features", lambda f: calls.append(1) or original(f))
    with torch.no_grad():
        feats = m.backbone(torch.rand(2, 3, 32, 32))
        pred = m.predict_all(feats, "dsA/subj01")  # 6 chunks of <= 4 voxels
    assert pred.shape == (2, 23) and len(calls) == 1


def test_fused_adamw_takes_the_same_steps_as_foreach():
    """The module's optimiser uses the fused AdamW kernel; over sparse-row steps of the crowd
    readout (only the sampled embedding rows have a gradient, weight decay on all) it follows
    the multi-tensor update to float32 rounding."""
    from brainenc.lit.encoder_module import adamw

    def run(fused: bool) -> UniversalReadout:
        r = _readout(dropout=0.0).train()
        groups = [{"params": list(r.parameters()), "lr": 3e-3}]
        opt = adamw(groups, 0.01) if fused else torch.optim.AdamW(groups, weight_decay=0.01, foreach=True)
        assert opt.defaults["fused"] is (True if fused else None)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            vox = torch.randperm(COUNTS["dsA/subj01"], generator=g)[:4]
            y = torch.randn(3, 4, generator=g)
            loss = ((r(_features(seed=step), "dsA/subj01", vox) - y) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return r

    a, b = run(True), run(False)
    start = _readout()
    moved = (a.embedding - start.embedding).abs().max()
    assert moved > 1e-3  # the steps did something
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- embeddings learn function
def test_trained_embeddings_separate_voxel_types_better_than_their_start(tiny_brain):
    """Tiny simbrain, one 7T-like subject: after a short fit, a voxel's nearest neighbours in
    embedding space share its true type (V1 vs hV4: pRF size and summation differ) far more often
    than chance, while the initial table sits at chance. With the old N(0, 1) start the trained
    table stayed at chance too (0.53 for V1 vs hV4, chance 0.525), so this bound can fail."""
    import h5py
    import lightning as L

    from brainenc.analysis.embedding_space import nn_same_label
    from brainenc.data.datamodule import BrainDataModule

    L.seed_everything(0, verbose=False)
    dm = BrainDataModule(stores=[str(tiny_brain["simbrain7t"])], subjects=["simbrain7t/subj01"],
                         image_size=32, batch_size=16, eval_batch_size=64)
    dm.setup()
    n = dm.pair("simbrain7t/subj01").info.n_voxels
    m = EncoderModule(backbone=Backbone("test_efficientnet", image_size=32), voxel_counts={"simbrain7t/subj01": n},
                      readout=lambda c, s: UniversalReadout(c, s, embed_dim=16, width=8, mlp_ratio=1.0,
                                                            dropout=0.0, max_grid=4))
    start = m.readout.embedding.detach().clone().numpy()
    L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              limit_val_batches=0).fit(m, datamodule=dm)
    trained = m.readout.embedding.detach().numpy()
    with h5py.File(dm.pair("simbrain7t/subj01").info.path, "r") as f:
        types = f["truth/voxel_type"][()]
    both = np.isin(types, [1, 4])                      # V1, hV4
    labels = np.where(types[both] == 1, 1, 2)
    chance = float(((np.bincount(labels)[1:] / len(labels)) ** 2).sum())
    before = nn_same_label(start[both], labels, k=5)
    after = nn_same_label(trained[both], labels, k=5)
    assert before < chance + 0.05                      # the random start carries no type
    assert after > chance + 0.12, (before, after, chance)


def test_shared_dropout_mask_is_one_mask_per_voxel_for_every_image():
    torch.manual_seed(0)
    ones = torch.ones(4, 50, 8)
    shared = VoxelCrossAttention(6, 5, width=8, embed_dim=12, dropout=0.5, shared_mask=True).train()
    out = shared._dropout(ones)
    assert set(out.unique().tolist()) == {0.0, 2.0}                # inverted dropout scaling
    assert torch.equal(out, out[:1].expand_as(out))                # the same mask for every image
    per_element = VoxelCrossAttention(6, 5, width=8, embed_dim=12, dropout=0.5).train()._dropout(ones)
    assert not torch.equal(per_element, per_element[:1].expand_as(per_element))
    assert torch.equal(shared.eval()._dropout(ones), ones)          # identity in evaluation


def test_balanced_initial_scale_of_the_two_readout_factors():
    """The table and feat_embed start at the same scale (so Adam moves both at the same relative
    rate) and the initial readout weights keep their ~0.1 output scale."""
    torch.manual_seed(0)
    r = UniversalReadout({"a/s": 4000}, SPEC, embed_dim=64, width=16)
    e, f = r.embedding.detach(), r.feat_embed.detach()
    assert e.std().item() == pytest.approx(f.std().item(), rel=0.05)
    assert e.std().item() == pytest.approx((0.1 / (64 * 32) ** 0.5) ** 0.5, rel=0.05)
    # W_v entries have sd 0.1 / sqrt(L d), so <h_v, W_v> over L d unit-variance features has sd ~0.1
    assert (e @ f).std().item() == pytest.approx(0.1 / 32 ** 0.5, rel=0.1)
    old = UniversalReadout({"a/s": 10}, SPEC, embed_dim=64, width=16, embed_init_std=1.0)
    assert old.embedding.std().item() > 0.9  # an explicit value is still honoured


def test_nn_same_label_and_embedding_structure():
    from brainenc.analysis.embedding_space import embedding_structure, nn_same_label

    rng = np.random.default_rng(0)
    labels = np.repeat([1, 2, 3], 50)
    grouped = rng.normal(size=(150, 8)) * 0.1 + np.eye(8)[labels] * 2
    assert nn_same_label(grouped, labels, k=5) == pytest.approx(1.0)
    assert abs(nn_same_label(rng.normal(size=(150, 8)), labels, k=5) - 1 / 3) < 0.1   # chance
    # label 0 (no ROI) rows are never queries
    assert nn_same_label(grouped, np.where(labels == 3, 0, labels), k=5) == pytest.approx(1.0)
    start = rng.normal(size=(150, 8))
    res = embedding_structure({"d/s": start + grouped * 10}, {"d/s": labels}, initial={"d/s": start}, n_clusters=3)
    assert res["ari"] > 0.9 and res["ari_learned"] == pytest.approx(1.0) and res["nn_same_roi"] > 0.9
    assert res["rel_displacement"] > 5


def test_position_control_finds_types_that_position_hides():
    """Embeddings = a small type signal + a large smooth function of the receptive-field centre:
    k-means follows position unless the position basis is regressed out."""
    from brainenc.analysis.embedding_space import position_basis

    rng = np.random.default_rng(0)
    n = 900
    truth = np.repeat([0, 1, 2], n // 3)
    centres = rng.uniform(-1, 1, (n, 2))
    b = position_basis(centres)
    emb = (b @ rng.normal(size=(b.shape[1], 32)) * 3 + np.eye(32)[truth + 5] * 1.0
           + rng.normal(size=(n, 32)) * 0.1)
    plain = cluster_embeddings(emb, 3, directions=False)
    controlled = cluster_embeddings(emb, 3, directions=False, control=b)
    ari = lambda lab: ari_table({"a/s": lab}, {"a/s": truth})["a/s"]["ari"]  # noqa: E731
    assert ari(plain) < 0.3
    assert ari(controlled) > 0.95


def test_decodable_types_reads_types_that_are_there_and_not_those_that_are_not():
    """The supervised reference: a classifier recovers types that shift the rows (ARI near 1),
    finds nothing in rows that carry no type (ARI near 0), and predicts every voxel out of fold."""
    from brainenc.analysis.type_information import decodable_types, type_information_of

    rng = np.random.default_rng(1)
    truth = np.repeat([0, 1, 2, 3], 150)
    noise = rng.normal(size=(600, 80))
    informative = noise + np.eye(80)[truth * 7] * 6.0
    ari = lambda lab: ari_table({"a/s": lab}, {"a/s": truth})["a/s"]["ari"]  # noqa: E731
    assert ari(decodable_types(informative, truth)) > 0.9
    assert abs(ari(decodable_types(noise, truth))) < 0.05
    # a type of one voxel is scored (it cannot be learned when held out), not refused
    rare = decodable_types(informative[:301], truth[:301])
    assert rare.shape == (301,) and (rare[:300] == truth[:300]).mean() > 0.95
    with pytest.raises(ValueError, match="at least two true types"):
        decodable_types(noise[:5], np.zeros(5, dtype=int))
    # the analysis leaves such a subject out of its tables and says why, instead of failing
    info = type_information_of({"ds/subj01": noise[:40]}, {"ds/subj01": np.zeros(40, dtype=int)}, stores={})
    assert set(info) == {"skipped"} and "two true types" in info["skipped"]["ds/subj01"]


def test_attention_centres_read_where_each_voxel_attends():
    """A readout wired so voxel i attends to token grid cell g_i gives that cell's centre."""
    from brainenc.analysis.embedding_space import attention_centres

    spec = FeatureSpec(shapes=((3, 4, 4),), pooled_dim=3, has_cls=False)
    r = UniversalReadout({"d/s": 5}, spec, embed_dim=17, width=17, mlp_ratio=0.0, dropout=0.0).eval()
    cells = [0, 3, 5, 10, 15]  # row-major on the 4 x 4 grid
    with torch.no_grad():
        mod = r.attn[0]
        mod.token_proj.weight.zero_()
        mod.token_proj.bias.zero_()
        mod.pos.copy_(torch.eye(17))          # token t's key is the t-th unit vector
        mod.k.weight.copy_(torch.eye(17))
        mod.q.weight.copy_(torch.eye(17) * 50.0)
        mod.q.bias.zero_()
        r.embedding.copy_(torch.eye(17)[[c + 1 for c in cells]])  # + 1: token 0 is the global token
    got = attention_centres(r, "d/s", _features_of(spec, 4))
    want = np.array([[(c % 4 + 0.5) / 4 * 2 - 1, (c // 4 + 0.5) / 4 * 2 - 1] for c in cells])
    assert np.allclose(got, want, atol=1e-3)


def _features_of(spec: FeatureSpec, b: int) -> Features:
    g = torch.Generator().manual_seed(1)
    return Features([torch.randn(b, c, h, w, generator=g) for c, h, w in spec.shapes])


def test_lr_scale_puts_named_parameters_in_their_own_group_and_steps_them_further():
    """``EncoderModule(lr_scale={prefix: k})``: parameters whose names start with the prefix get
    k times the rate; Adam's first step moves every coordinate by about its rate, so the scaled
    embedding moves k times as far as the unscaled attention weights."""
    from brainenc.lit.encoder_module import adamw, lr_groups

    r = _readout(dropout=0.0).train()
    named = [(f"readout.{n}", p) for n, p in r.named_parameters()]
    groups = lr_groups(named, 1e-3, {"readout.embedding": 3.0})
    assert [g["lr"] for g in groups] == [1e-3, 3e-3]
    assert len(groups[1]["params"]) == 1 and groups[1]["params"][0] is r.embedding
    assert sum(len(g["params"]) for g in groups) == len(named)
    start = {n: p.detach().clone() for n, p in named}
    opt = adamw(groups, 0.0)
    loss = (r(_features(seed=0), "dsA/subj01") ** 2).mean()
    loss.backward()
    opt.step()
    step = {n: float((p.detach() - start[n]).abs().max()) for n, p in named}
    assert step["readout.embedding"] == pytest.approx(3e-3, rel=0.05)
    assert step["readout.feat_embed"] == pytest.approx(1e-3, rel=0.05)
    with pytest.raises(ValueError, match="no trainable parameter name starts with"):
        lr_groups(named, 1e-3, {"readout.embeding": 3.0})
