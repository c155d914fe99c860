"""The VQ tokenizer: quantiser maths, API shapes, losses, a short training run, code files, real photos."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import manifest
import prepare
import vqgan

TINY = vqgan.VQConfig(image_size=64, channels=32, n_res_blocks=1, codebook_size=64)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A 12/6/6-scene dataset, rendered once for the module."""
    d = str(tmp_path_factory.mktemp("data"))
    data.build_dataset(d, 12, 6, 6, data.SceneConfig(), seed=0)
    return d


def tiny_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = vqgan.VQModel(TINY)
    vqgan.trainer.save_checkpoint(path, {"model_args": asdict(TINY), "model": model.state_dict(), "depth_encoding": "log",
                                         "seg_colouring": data.SEG_COLOURING})
    return path


def test_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = vqgan.VQModel(TINY)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    recon, codes, vq_loss, z = model(x)
    (recon - x).abs().mean().backward()  # the reconstruction alone: no path to the encoder but straight-through
    g = model.encoder.net[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    # and exactly the identity through the lookup: d(z_q)/d(z_normalised) = I
    z = F.normalize(torch.randn(1, TINY.code_dim, 2, 2), dim=1).requires_grad_()
    z_q, _, _ = model.quantizer(z)
    w = torch.randn_like(z_q)
    (z_q * w).sum().backward()
    assert torch.allclose(z.grad, w - (w * z).sum(1, keepdim=True) * z, atol=1e-5)  # projected onto the sphere


def test_lookup_equals_brute_force_nearest_code():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(100, 8, beta=0.25)
    q.codebook.data.mul_(torch.rand(100, 1) * 3 + 0.1)  # unnormalised storage must not matter
    z = torch.randn(500, 8) * 5
    ids = q.lookup(F.normalize(z, dim=1))
    zn, e = F.normalize(z, dim=1), F.normalize(q.codebook, dim=1)
    brute = ((zn[:, None, :] - e[None, :, :]) ** 2).sum(-1).argmin(1)  # every distance, in l2
    assert torch.equal(ids, brute)


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_encode_decode_shapes_and_dtypes(batch):
    model = vqgan.VQModel(TINY).eval()
    images = np.random.default_rng(batch).integers(0, 256, (batch, 64, 64, 3), dtype=np.uint8)
    codes = model.encode(images)
    assert codes.shape == (batch, 16, 16) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < TINY.codebook_size
    out = model.decode(codes)
    assert out.shape == (batch, 64, 64, 3) and out.dtype == torch.uint8
    flat = codes.reshape(batch, -1).numpy().astype(np.uint16)  # as stored in codes.npy
    assert torch.equal(model.decode(flat), out)
    assert torch.equal(model.encode(torch.as_tensor(images)), codes)


def test_adaptive_weight_is_finite_and_clamped():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    out = last(h)
    rec = out.abs().mean()
    disc = vqgan.PatchDiscriminator(8)
    g = -disc(out).mean()
    w = vqgan.adaptive_weight(rec, g, last.weight, max_weight=1e4)
    assert torch.isfinite(w) and 0 < w < 1e4 and not w.requires_grad
    # a GAN loss with (almost) no gradient asks for an enormous weight: it must stop at the clamp
    w = vqgan.adaptive_weight(rec, 1e-9 * g, last.weight, max_weight=5.0)
    assert w.item() == 5.0


def test_code_stats_usage_and_perplexity():
    counts = torch.zeros(64, dtype=torch.long)
    counts[:16] = 7
    usage, ppl = vqgan.code_stats(counts)
    assert usage == 0.25 and abs(ppl - 16) < 1e-6
    counts[0] = 10 ** 6  # one code dominates: perplexity falls towards 1
    assert vqgan.code_stats(counts)[1] < 1.1


def test_dead_codes_restart_onto_encoder_outputs():
    torch.manual_seed(0)
    q = vqgan.VectorQuantizer(32, 8, beta=0.25, usage_decay=0.5)
    z = torch.randn(4, 8, 4, 4)
    codes = torch.zeros(4, 4, 4, dtype=torch.long)  # only code 0 ever used
    for _ in range(10):
        n = q.restart_dead_codes(z, codes)
    assert n == 0 and q.usage[1:].min() >= 0.1 / 32  # all 31 unused codes were restarted once, then given grace
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 8), dim=1)
    nearest = (F.normalize(q.codebook[1:], dim=1) @ zn.t()).max(1).values
    assert nearest.min() > 0.99  # each restarted code sits on one of the batch's encoder outputs


def test_short_training_lowers_reconstruction_loss(tiny_data):
    torch.manual_seed(0)
    _, images = vqgan.load_pseudo_images(tiny_data, "train")
    x = vqgan.images_to_tensor(np.concatenate([images[m][:4] for m in data.MODALITIES]))
    model, disc = vqgan.VQModel(TINY), vqgan.PatchDiscriminator(8)
    tc = vqgan.TrainConfig(disc_start=20)
    opt_g = torch.optim.Adam(model.parameters(), lr=2e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4)
    losses = [vqgan.train_step(model, disc, opt_g, opt_d, x, step, tc)[0] for step in range(30)]
    assert losses[-1]["rec"] < 0.6 * losses[0]["rec"]
    assert "d" in losses[-1] and np.isfinite(losses[-1]["gan_weight"])  # the GAN switched on at disc_start


def test_train_writes_loadable_checkpoint_and_grid(tiny_data, tmp_path):
    tc = vqgan.TrainConfig(data_dir=tiny_data, out_dir=str(tmp_path), batch_size=6, max_iters=4, disc_start=2,
                           log_interval=2)
    final = vqgan.train(tc, TINY)
    for key in ("rgb_psnr", "depth_absrel", "object_depth_absrel", "seg_miou", "code_usage", "perplexity"):
        assert np.isfinite(final[key])
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["codebook_size"] == 64 and ckpt["depth_encoding"] == data.DEPTH_ENCODING
    assert Image.open(tmp_path / "recon.png").size == (2 * 6 * (2 * 64 + 4), 2 * 3 * (64 + 4))  # 3 rows × 6 pairs, ×2
    model = vqgan.load_vqgan(str(tmp_path / "ckpt.pt"))
    assert not model.training
    ckpt["seg_colouring"] = data.SEG_COLOURING - 1  # a tokenizer trained on other seg colours is refused, by name
    torch.save(ckpt, tmp_path / "old.pt")
    with pytest.raises(SystemExit, match="coloured in format"):
        vqgan.load_vqgan(str(tmp_path / "old.pt"))


def test_weighted_l1_counts_each_pixel_by_its_weight():
    """All-ones weights give plain L1; an error where the weight is 0 counts for nothing, and one
    where it is 8 counts 8 times one where it is 1."""
    x = torch.zeros(1, 3, 4, 4)
    recon = x.clone()
    recon[0, :, 0, 0] = 1.0
    ones = torch.ones(1, 1, 4, 4)
    assert vqgan.weighted_l1(recon, x, ones) == vqgan.weighted_l1(recon, x) == (recon - x).abs().mean()
    off = ones.clone()
    off[0, 0, 0, 0] = 0
    assert vqgan.weighted_l1(recon, x, off) == 0
    heavy = ones.clone()
    heavy[0, 0, 0, 0] = 8
    torch.testing.assert_close(vqgan.weighted_l1(recon, x, heavy), 8 * vqgan.weighted_l1(recon, x, ones) / heavy.mean())


def test_plain_l1_trains(tiny_data, tmp_path):
    """object_weight=1 (every pixel alike, no weight map) trains as well as the default."""
    tc = vqgan.TrainConfig(data_dir=tiny_data, out_dir=str(tmp_path), batch_size=6, max_iters=3, disc_start=10,
                           log_interval=1, object_weight=1.0)
    assert np.isfinite(vqgan.train(tc, TINY)["rgb_psnr"])


def test_train_refuses_images_of_another_size(tiny_data, tmp_path):
    tc = vqgan.TrainConfig(data_dir=tiny_data, out_dir=str(tmp_path), max_iters=4)
    with pytest.raises(ValueError, match="64 px but the tokenizer is set up for 48 px"):
        vqgan.train(tc, vqgan.VQConfig(image_size=48, channels=32, n_res_blocks=1, codebook_size=64))
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_code_files_round_trip(tiny_data, tmp_path):
    ckpt = tiny_checkpoint(str(tmp_path / "ckpt.pt"))
    paths = prepare.ensure_codes(tiny_data, ckpt)
    model = vqgan.load_vqgan(ckpt)
    split, images = vqgan.load_pseudo_images(tiny_data, "val")
    codes = vqgan.load_codes(tiny_data, "val")
    assert codes.dtype == np.uint16 and codes.shape == (6, 3, 16 * 16)
    for j, m in enumerate(data.MODALITIES):
        assert np.array_equal(codes[:, j], model.encode(images[m]).reshape(6, -1).numpy())
        assert torch.equal(model.decode(codes[:, j]), model.decode(model.encode(images[m])))
    meta = json.load(open(os.path.join(tiny_data, "val", "codes.json")))
    assert meta["grid"] == [16, 16] and meta["modalities"] == list(data.MODALITIES)
    # up-to-date codes are left alone; a different checkpoint makes them stale
    mtime = os.path.getmtime(paths["val"])
    prepare.ensure_codes(tiny_data, ckpt)
    assert os.path.getmtime(paths["val"]) == mtime
    tiny_checkpoint(ckpt, seed=1)
    prepare.ensure_codes(tiny_data, ckpt)
    assert not np.array_equal(vqgan.load_codes(tiny_data, "val"), codes)


def test_photo_of_arbitrary_size_encodes_and_decodes(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (71, 97, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"image": "photo.png", "question": "q", "answer": "a", "category": "general"}) + "\n")
    photo = manifest.load_manifest(str(path), image_size=64)
    model = vqgan.VQModel(TINY).eval()
    codes = model.encode(photo["rgb"])
    assert codes.shape == (1, 16, 16)
    assert model.decode(codes).shape == (1, 64, 64, 3)


def test_code_patches_are_each_codes_mean_patch():
    """2×2 codes on 4×4 images: a code's row is the mean of the 2×2×3 patches it was chosen for,
    over all three modalities; a code never chosen has zeros."""
    rng = np.random.default_rng(0)
    images = {m: rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8) for m in data.MODALITIES}
    codes = rng.integers(0, 5, (3, len(data.MODALITIES), 4))
    table = vqgan.code_patches(codes, images, codebook_size=6)
    assert table.shape == (6, 12) and table.dtype == np.float32
    for c in range(6):
        patches = [images[m][i, 2 * (k // 2):2 * (k // 2) + 2, 2 * (k % 2):2 * (k % 2) + 2].reshape(-1)
                   for i in range(3) for j, m in enumerate(data.MODALITIES) for k in range(4) if codes[i, j, k] == c]
        expect = np.mean(patches, axis=0) / 127.5 - 1 if patches else np.zeros(12)
        np.testing.assert_allclose(table[c], expect, atol=1e-5)
