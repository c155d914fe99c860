"""
The VQ image tokenizer: one small VQGAN turns every picture nanoCOOPER sees or draws (RGB photos,
depth pseudo-images, segmentation pseudo-images) into a short grid of discrete codes, so the
transformer can read and write images as ordinary tokens (COOPER §3.1 trains its generator on depth
and segmentation converted to RGB-like images, which is what makes one tokenizer enough).

The one idea: an autoencoder with a *discrete* bottleneck. The encoder maps an image (48×48 in the
tiny preset) to an h×w grid of vectors; each vector is replaced by its nearest entry of a learned
codebook (that index is the token); the decoder paints the image back from the codebook entries.
Gradients jump over the non-differentiable lookup with the straight-through estimator.

    encoder ──project to 8-d, l2-normalise──▶ nearest code (argmax cosine) ──▶ code ids (B, h, w)
    code ids ──codebook──project back up──▶ decoder ──▶ image

Pieces, in reading order: VQConfig; ResBlock, Encoder, Decoder; VectorQuantizer (LlamaGen-style
8-d l2-normalised codes, a usage meter, dead-code restarts); VQModel with the `encode(images) ->
codes` / `decode(codes) -> images` API the rest of the project uses; the losses (L1 reconstruction,
codebook + commitment, hinge PatchGAN with taming-transformers' adaptive weight, switched on at
disc_start); the training loop; the round-trip evaluation; code files.

    python vqgan.py                       # train at these defaults, evaluate on val, write checkpoint + PNG
    python vqgan.py config/tiny_cpu.py    # the tiny preset's shorter VQ
    python vqgan.py --encode              # encode every split to {data_dir}/{split}/codes.npy
    python vqgan.py --max_iters=200 ...   # any TrainConfig / VQConfig field is a --key=value override

Why these choices (each measured on the full round trip image -> codes -> image -> metres / ids;
the runs are in docs/experiments.md, "VQ tokenizer: grid, batch, codebook, depth encoding, GAN,
image size"):
  - downsampling f=4: a code covers a 4×4 patch, about the smallest object the renderer keeps
    visible; f=8 halves every map's quality (per-object depth error 3.2% -> 6.9% at 64 px);
  - many small batches beat few large ones at a fixed number of images seen (batch 8, not 32);
  - log depth beats linear through the VQ as well as before it; a 4× codebook did not help;
  - the GAN is light (weight 0.1 from 3/4 of training): heavier cost RGB quality and did not
    sharpen segmentation edges;
  - 4800 steps at 48 px: segmentation is the modality that keeps gaining from training longer
    (small objects' outlines), and a generated map can only be as good as the round trip of the
    true one; drawing seg images twice as often reaches that seg round trip in 3200 steps at 0.5 dB
    of RGB (the tiny preset trains 2400, for its time: palette mIoU 0.699 against 0.712); 96 channels
    cost 0.6× the time of 128 for the same RGB and depth round trip.

Files: checkpoint `out/vqgan/ckpt.pt` (torch.load(..., weights_only=True): model_args, model,
discriminator, config, metrics), reconstructions `out/vqgan/recon.png`, codes
`{data_dir}/{split}/codes.npy` (N, 3, h*w) uint16 in data.MODALITIES order with `codes.json` beside
it naming the checkpoint they came from. prepare.py encodes the splits whose codes are missing or stale.
"""
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics  # the same map metrics the model's generated maps are scored by
import trainer  # the project's LR schedule and atomic checkpoint writer


# -----------------------------------------------------------------------------
# Model config: everything needed to rebuild the tokenizer from a checkpoint.

@dataclass
class VQConfig:
    image_size: int = 48           # must match the data's (train() checks)
    downsample: int = 4            # f: a 48×48 image becomes (48/f)×(48/f) codes
    channels: int = 96             # width at the code grid, where most of the compute is spent
    n_res_blocks: int = 2          # residual blocks at the code grid, in encoder and decoder each
    codebook_size: int = 1024
    code_dim: int = 8              # lookup happens in this low dimension (LlamaGen)
    beta: float = 0.25             # commitment weight: pulls the encoder towards its chosen code

    @property
    def grid(self):
        return self.image_size // self.downsample


# -----------------------------------------------------------------------------
# Encoder and decoder: plain convolutions and residual blocks. Compute goes where the pixels are
# few: the stem halves the resolution straight away, and full resolution is only ever touched by one
# cheap convolution at each end.

def _norm(c):
    return nn.GroupNorm(min(32, c // 4), c)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


def _widths(cfg):
    """Channel width at each resolution, from full resolution down to the code grid: halve the width
    every time the resolution doubles, so each level costs about the same."""
    n_levels = int(math.log2(cfg.downsample))
    assert 2 ** n_levels == cfg.downsample and n_levels >= 1, "downsample must be a power of two ≥ 2"
    return [max(16, cfg.channels >> (n_levels - i)) for i in range(n_levels + 1)]


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = _widths(cfg)
        # stride-2 stem: full resolution → 1/2, then one strided conv per further halving
        layers = [nn.Conv2d(3, w[1], 4, stride=2, padding=1)]
        for i in range(1, len(w) - 1):
            layers += [ResBlock(w[i], w[i]), nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1)]
        layers += [ResBlock(w[-1], w[-1]) for _ in range(cfg.n_res_blocks)]
        layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.code_dim, 1)]  # project in
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = _widths(cfg)
        layers = [nn.Conv2d(cfg.code_dim, w[-1], 3, padding=1)]  # project out
        layers += [ResBlock(w[-1], w[-1]) for _ in range(cfg.n_res_blocks)]
        for i in range(len(w) - 1, 1, -1):  # up to 1/2 resolution: nearest ×2, conv, residual block
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w[i], w[i - 1], 3, padding=1),
                       ResBlock(w[i - 1], w[i - 1])]
        layers += [_norm(w[1]), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        # the last layer paints each 2×2 pixel block from one half-resolution feature (pixel shuffle):
        # sharp edges at full resolution for the price of a half-resolution convolution
        self.last_layer = nn.Conv2d(w[1], 3 * 4, 3, padding=1)

    def forward(self, z):
        return F.pixel_shuffle(self.last_layer(self.net(z)), 2)


# -----------------------------------------------------------------------------
# The vector quantiser. Looking codes up among l2-normalised 8-d vectors (LlamaGen) does two things:
# nearest-neighbour search becomes a cosine similarity, so no code can win just by having a large
# norm, and a low dimension keeps more of the codebook in use.

def code_stats(counts):
    """The usage meter, from a histogram of code ids (K,): the fraction of the codebook in use, and
    the perplexity exp(entropy) (= K if every code were equally frequent, 1 if only one is used)."""
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), entropy.exp().item()


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size, code_dim, beta, usage_decay=0.95, dead_fraction=0.1):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Parameter(F.normalize(torch.randn(codebook_size, code_dim), dim=1))
        # running share of assignments per code, for dead-code restarts (starts uniform)
        self.register_buffer("usage", torch.full((codebook_size,), 1.0 / codebook_size))
        self.usage_decay, self.dead_fraction = usage_decay, dead_fraction

    def lookup(self, z):
        """z (n, d) l2-normalised -> nearest code ids (n,). For unit vectors ‖z−e‖² = 2 − 2 z·e, so
        the nearest code is the one with the largest dot product."""
        return (z @ F.normalize(self.codebook, dim=1).t()).argmax(dim=1)

    def embed(self, codes):
        """Code ids (any shape) -> their unit vectors, shape (..., d)."""
        return F.normalize(self.codebook, dim=1)[codes]

    def forward(self, z):
        """z (B, d, h, w) from the encoder -> (z_q (B, d, h, w) with straight-through gradient,
        codes (B, h, w), vq_loss)."""
        B, d, h, w = z.shape
        z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)
        codes = self.lookup(z)
        e = self.embed(codes)
        # codebook term moves codes towards the encoder outputs; the commitment term (weight β) keeps
        # the encoder from drifting away from its codes
        vq_loss = F.mse_loss(e, z.detach()) + self.beta * F.mse_loss(z, e.detach())
        # straight-through: the forward pass uses e, the backward pass copies z_q's gradient to z
        z_q = z + (e - z).detach()
        return z_q.reshape(B, h, w, d).permute(0, 3, 1, 2), codes.reshape(B, h, w), vq_loss

    @torch.no_grad()
    def restart_dead_codes(self, z, codes):
        """Update each code's running share with this batch's codes, then move the codes whose share
        fell below dead_fraction/K onto random encoder outputs z (B, d, h, w) of this batch. Without
        this the codebook collapses to a few percent in use. Returns how many codes were restarted."""
        share = torch.bincount(codes.reshape(-1), minlength=len(self.usage)).float() / codes.numel()
        self.usage.mul_(self.usage_decay).add_(share, alpha=1 - self.usage_decay)
        dead = self.usage < self.dead_fraction / len(self.usage)
        n = int(dead.sum())
        if n:
            z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
            pick = z[torch.randint(len(z), (n,), device=z.device)]
            self.codebook[dead] = F.normalize(pick + 0.01 * torch.randn_like(pick), dim=1)
            self.usage[dead] = 1.0 / len(self.usage)  # a grace period before it can be judged dead again
        return n


# -----------------------------------------------------------------------------
# The tokenizer. Inside, images are float (B, 3, H, W) in [-1, 1]; at the API they are what the data
# pipeline stores, uint8 (B, H, W, 3), and codes are integer grids (B, h, w).

def images_to_tensor(images, device="cpu"):
    """uint8 (B, H, W, 3) numpy or tensor -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images, device=device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def tensor_to_images(x):
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) tensor on the CPU."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta)
        self.decoder = Decoder(cfg)

    def forward(self, x):
        """Training pass: x (B, 3, H, W) in [-1, 1] -> (reconstruction, codes, vq_loss, z)."""
        z = self.encoder(x)
        z_q, codes, vq_loss = self.quantizer(z)
        return self.decoder(z_q), codes, vq_loss, z

    @torch.no_grad()
    def encode(self, images):
        """uint8 images (B, H, W, 3) -> code ids (B, h, w), int64 tensor."""
        device = next(self.parameters()).device
        z = self.encoder(images_to_tensor(images, device))
        B, d, h, w = z.shape
        return self.quantizer.lookup(F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=1)).reshape(B, h, w)

    @torch.no_grad()
    def decode(self, codes):
        """Code ids (B, h, w) or (B, h*w), any integer dtype -> uint8 images (B, H, W, 3) tensor."""
        device = next(self.parameters()).device
        codes = torch.as_tensor(np.asarray(codes).astype(np.int64) if not torch.is_tensor(codes) else codes)
        g = self.cfg.grid
        codes = codes.to(device).long().reshape(-1, g, g)
        z_q = self.quantizer.embed(codes).permute(0, 3, 1, 2)
        return tensor_to_images(self.decoder(z_q))


# -----------------------------------------------------------------------------
# Losses beyond reconstruction: a patch discriminator (taming-transformers' PatchGAN) says, for every
# overlapping patch, whether it looks real; its hinge loss sharpens what L1 alone leaves soft. There
# is no perceptual (LPIPS) term: it needs a pretrained network, and none exists offline.

class PatchDiscriminator(nn.Module):
    def __init__(self, channels=32, n_layers=2):
        super().__init__()
        layers, c = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)], channels
        for _ in range(n_layers - 1):
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), _norm(2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        layers += [nn.Conv2d(c, c, 3, padding=1), _norm(c), nn.LeakyReLU(0.2), nn.Conv2d(c, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)  # (B, 1, h', w'): one real/fake logit per patch


def hinge_d_loss(logits_real, logits_fake):
    """The discriminator wants real logits ≥ 1 and fake logits ≤ −1; beyond that it stops pushing."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight=1e4):
    """taming-transformers' balance: scale the GAN loss so its gradient at the decoder's last layer
    is as large as the reconstruction loss's gradient there. Clamped, because a discriminator with
    nearly no gradient would otherwise ask for an enormous weight."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()


# -----------------------------------------------------------------------------
# Training. The tiny preset is the defaults; `python vqgan.py --key=value` overrides any field here
# or in VQConfig.

@dataclass
class TrainConfig:
    data_dir: str = "data/tiny"
    out_dir: str = "out/vqgan"         # ckpt.pt and recon.png go here
    depth_encoding: str = ""           # "" = data.DEPTH_ENCODING; "log" or "linear" to compare them
    batch_size: int = 8                # images; each drawn at random from the pool of all three modalities
    modality_weights: tuple = (1.0, 1.0, 1.0)  # how often rgb, depth, seg images are drawn
    max_iters: int = 4800
    learning_rate: float = 2e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    object_weight: float = 8.0         # L1 weight of object pixels (seg id >= 2, in all three images) against the rest
    disc_start: int = 3600             # step at which the GAN loss switches on (0 = from the start)
    disc_weight: float = 0.1           # multiplies the adaptive weight
    max_gan_weight: float = 1e4        # clamp of the adaptive weight
    disc_lr: float = 2e-4
    disc_channels: int = 32
    log_interval: int = 200
    seed: int = 1337
    device: str = "auto"               # auto = cuda if available, else cpu (fp32 either way)


def psnr(a, b):
    """Mean per-image PSNR in dB between two image batches of the same scale (peak 255 for uint8,
    or floats in [-1, 1] where the peak-to-peak is 2)."""
    peak = 255.0 if a.dtype == torch.uint8 else 2.0
    mse = ((a.double() - b.double()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(peak ** 2 / mse)).mean().item()


def weighted_l1(recon, x, weight=None):
    """Mean absolute error (L1: sharper than L2 and kind to flat regions), each pixel weighted by
    weight (B, 1, H, W) and normalised by the mean weight, so a weight of all ones is plain L1."""
    err = (recon - x).abs()
    return err.mean() if weight is None else (err * weight).mean() / weight.mean()


def train_step(model, disc, opt_g, opt_d, x, step, tc, weight=None):
    """One generator update (reconstruction + VQ, + adaptive-weighted GAN after disc_start), the
    dead-code restarts, then one discriminator update. weight (B, 1, H, W) weighs each pixel's L1.
    Returns a dict of the step's figures."""
    recon, codes, vq_loss, z = model(x)
    rec_loss = weighted_l1(recon, x, weight)
    loss = rec_loss + vq_loss
    log = {"rec": rec_loss.item(), "vq": vq_loss.item(), "psnr": psnr(recon, x)}
    gan_on = step >= tc.disc_start
    if gan_on:
        g_loss = -disc(recon).mean()
        weight = tc.disc_weight * adaptive_weight(rec_loss, g_loss, model.decoder.last_layer.weight, tc.max_gan_weight)
        loss = loss + weight * g_loss
        log.update(g=g_loss.item(), gan_weight=weight.item())
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    log["restarts"] = model.quantizer.restart_dead_codes(z.detach(), codes)
    if gan_on:
        d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
        opt_d.zero_grad(set_to_none=True)  # also drops the grads g_loss left in the discriminator
        d_loss.backward()
        opt_d.step()
        log["d"] = d_loss.item()
    return log, codes


def load_pseudo_images(data_dir, split, depth_encoding=""):
    """A split and its three pseudo-images per scene, {"rgb", "depth", "seg"} each uint8 (N, H, W, 3)."""
    s = data.load_split(data_dir, split)
    images = data.pseudo_images(s)
    if depth_encoding and depth_encoding != data.DEPTH_ENCODING:
        images["depth"] = data.depth_to_rgb(s["depth"], encoding=depth_encoding)
    return s, images


def batched(fn, x, batch_size=256):
    """fn applied to x in slices of batch_size (bounded memory), results concatenated on the CPU."""
    return torch.cat([fn(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])


def evaluate(model, split, images, depth_encoding):
    """The full round trip on a split: image -> codes -> image -> metric depth / instance ids,
    scored against the renderer's exact maps. Returns (metrics, reconstructions by modality)."""
    was_training = model.training
    model.eval()
    codes = {m: batched(model.encode, images[m]) for m in data.MODALITIES}
    recon = {m: batched(model.decode, codes[m]) for m in data.MODALITIES}
    model.train(was_training)
    all_codes = torch.cat([codes[m] for m in data.MODALITIES]).reshape(-1)
    usage, perplexity = code_stats(torch.bincount(all_codes, minlength=model.cfg.codebook_size))
    scores = {f"{m}_psnr": psnr(recon[m], torch.as_tensor(images[m])) for m in data.MODALITIES}

    seg = split["seg"]
    for name, img in (("", recon["depth"].numpy()), ("_floor", images["depth"])):
        # _floor: the pseudo-image itself, before any VQ: the 8-bit encoding's own error
        m = metrics.depth_metrics(data.rgb_to_depth(img, encoding=depth_encoding), split["depth"], seg)
        scores.update({f"{k}{name}": m[k] for k in ("depth_absrel", "depth_absrel_median", "object_depth_absrel")})
    scores["seg_miou"] = metrics.seg_miou(data.rgb_to_seg(recon["seg"].numpy()), data.seg_palette_ids(seg, split["scenes"]))
    scores["code_usage"], scores["perplexity"] = usage, perplexity
    return {k: round(v, 4) for k, v in scores.items()}, recon


def save_recon_grid(images, recon, path, n=6, scale=2):
    """PNG: one row per modality, columns alternate input | reconstruction for the first n scenes."""
    from PIL import Image
    rows = []
    for m in images:
        pairs = [np.concatenate([images[m][i], recon[m][i].numpy()], axis=1) for i in range(min(n, len(images[m])))]
        rows.append(np.concatenate([np.pad(p, ((2, 2), (2, 2), (0, 0)), constant_values=255) for p in pairs], axis=1))
    grid = np.concatenate(rows, axis=0).repeat(scale, 0).repeat(scale, 1)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid).save(path)


def load_vqgan(path, device="cpu"):
    """The tokenizer from a checkpoint, in eval mode. `model.depth_encoding` says how its depth
    pseudo-images map to metres (pass it to data.rgb_to_depth)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if ckpt.get("seg_colouring", 1) != data.SEG_COLOURING:  # its seg codes would mean other objects
        raise SystemExit(f"{path} was trained on segmentation pseudo-images coloured in format {ckpt.get('seg_colouring', 1)}, "
                         f"not {data.SEG_COLOURING} (data.seg_palette_ids): remove it to train it again (python vqgan.py)")
    model = VQModel(VQConfig(**ckpt["model_args"])).to(device)
    model.load_state_dict(ckpt["model"])
    model.depth_encoding = ckpt["depth_encoding"]
    return model.eval()


def train(tc, mc):
    """Train the tokenizer on train-split images of all three modalities, evaluate the round trip
    on val, write ckpt.pt and recon.png to tc.out_dir. Returns the final metrics."""
    torch.manual_seed(tc.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if tc.device == "auto" else tc.device
    encoding = tc.depth_encoding or data.DEPTH_ENCODING
    size = data.load_meta(tc.data_dir)["config"]["image_size"]
    if size != mc.image_size:
        raise ValueError(f"the images in {tc.data_dir} are {size} px but the tokenizer is set up for "
                         f"{mc.image_size} px: pass --image_size={size}")
    train_split, train_images = load_pseudo_images(tc.data_dir, "train", encoding)
    val_split, val_images = load_pseudo_images(tc.data_dir, "val", encoding)
    # one pool of images: a batch mixes RGB, depth and segmentation, so one codebook learns all three
    pool = torch.as_tensor(np.concatenate([train_images[m] for m in data.MODALITIES]))
    draw = torch.tensor(tc.modality_weights, dtype=torch.float).repeat_interleave(len(pool) // 3)
    # Most pixels are ground and sky; an object of a few pixels shares a code's 4×4 patch with them, and
    # plain L1 lets the code keep the background and lose the object's colour (41% of objects under 24
    # pixels came back another colour). object_weight says how much more an object pixel counts.
    objects = torch.from_numpy(train_split["seg"] >= 2).repeat(3, 1, 1)
    print(f"training a {mc.grid}x{mc.grid}-code tokenizer on {len(pool)} images ({encoding} depth), device {device}")

    model = VQModel(mc).to(device)
    disc = PatchDiscriminator(tc.disc_channels).to(device)
    print(f"tokenizer {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"discriminator {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M")
    opt_g = torch.optim.Adam(model.parameters(), lr=tc.learning_rate, betas=(0.9, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=tc.disc_lr, betas=(0.5, 0.9))

    seen = torch.zeros(mc.codebook_size, dtype=torch.long)  # the usage meter between log lines
    restarts = 0
    t0 = t_log = time.time()
    last_log = -1
    for step in range(tc.max_iters):
        for group in opt_g.param_groups:
            group["lr"] = trainer.lr_at(step, asdict(tc))  # warm-up, then cosine decay (nanoGPT)
        pick = torch.multinomial(draw, tc.batch_size, replacement=True)
        x = images_to_tensor(pool[pick], device)
        weight = None if tc.object_weight == 1 else (1 + (tc.object_weight - 1) * objects[pick, None].float()).to(device)
        log, codes = train_step(model, disc, opt_g, opt_d, x, step, tc, weight)
        seen += torch.bincount(codes.reshape(-1).cpu(), minlength=mc.codebook_size)
        restarts += log["restarts"]
        if step % tc.log_interval == 0 or step == tc.max_iters - 1:
            usage, perplexity = code_stats(seen)
            ms = (time.time() - t_log) * 1000 / (step - last_log)
            gan = f" g {log['g']:.3f} d {log['d']:.3f} w {log['gan_weight']:.3f}" if "d" in log else ""
            print(f"step {step:5d} | rec {log['rec']:.4f} vq {log['vq']:.4f}{gan} | psnr {log['psnr']:5.2f} | "
                  f"usage {usage:.2f} ppl {perplexity:6.1f} restarts {restarts:3d} | {ms:.0f} ms/step")
            seen.zero_()
            restarts = 0
            t_log, last_log = time.time(), step
    train_seconds = time.time() - t0

    scores, recon = evaluate(model, val_split, val_images, encoding)
    scores["train_seconds"] = round(train_seconds, 1)
    print("val round trip: " + ", ".join(f"{k} {v}" for k, v in scores.items()))
    save_recon_grid(val_images, recon, os.path.join(tc.out_dir, "recon.png"))
    trainer.save_checkpoint(os.path.join(tc.out_dir, "ckpt.pt"), {
        "model_args": asdict(mc), "model": model.state_dict(), "discriminator": disc.state_dict(),
        "config": asdict(tc), "depth_encoding": encoding, "seg_colouring": data.SEG_COLOURING, "step": tc.max_iters,
        "metrics": scores})
    print(f"wrote {os.path.join(tc.out_dir, 'ckpt.pt')} and {os.path.join(tc.out_dir, 'recon.png')}")
    return {"grid": mc.grid, "depth_encoding": encoding, **scores}


# -----------------------------------------------------------------------------
# Code files: every split is encoded once, so no transformer training loop ever runs the encoder.
# {data_dir}/{split}/codes.npy is (N, 3, h*w) uint16, modalities in data.MODALITIES order, codes in
# raster order; codes.json beside it records which checkpoint made them, so stale codes are redone.

def codes_path(data_dir, split):
    return os.path.join(data_dir, split, "codes.npy")


def load_codes(data_dir, split):
    """(N, 3, h*w) uint16 codes of a split: codes[i, data.MODALITIES.index("depth")] is scene i's depth map."""
    return np.load(codes_path(data_dir, split))


def code_patches(codes, images, codebook_size):
    """What each code looks like: (codebook_size, p*p*3) float32, the mean pixel patch (in [-1, 1])
    at every place the code was chosen, over the given pseudo-images {modality: (N, H, W, 3)
    uint8} and their codes (N, len(data.MODALITIES), h*w). A code never chosen gets zeros. The
    transformer adds a projection of this row to the code's embedding (GPTConfig.code_patch_dim)."""
    n, _, places = codes.shape
    side = math.isqrt(places)
    size = images["rgb"].shape[1]
    p = size // side
    total = torch.zeros(codebook_size, p * p * 3, dtype=torch.float64)
    count = torch.zeros(codebook_size, dtype=torch.float64)
    for m, modality in enumerate(data.MODALITIES):
        x = images[modality].reshape(n, side, p, side, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * 3)
        ids = torch.from_numpy(codes[:, m].reshape(-1).astype(np.int64))
        total.index_add_(0, ids, torch.from_numpy(x.astype(np.float64) / 127.5 - 1))
        count += torch.bincount(ids, minlength=codebook_size).double()
    return (total / count.clamp(min=1)[:, None]).float().numpy()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_split(model, data_dir, split, ckpt_path):
    """Encode the three pseudo-images of every scene of a split; write codes.npy and codes.json."""
    assert model.cfg.codebook_size <= 65536, "codes are stored as uint16"
    _, images = load_pseudo_images(data_dir, split, model.depth_encoding)
    codes = np.stack([batched(model.encode, images[m]).numpy() for m in data.MODALITIES], axis=1)
    path = codes_path(data_dir, split)
    with open(path + ".tmp", "wb") as f:
        np.save(f, codes.reshape(len(codes), len(data.MODALITIES), -1).astype(np.uint16))
    os.replace(path + ".tmp", path)
    meta = {"checkpoint": ckpt_path, "checkpoint_sha256": sha256(ckpt_path), "grid": [model.cfg.grid] * 2,
            "codebook_size": model.cfg.codebook_size, "modalities": list(data.MODALITIES),
            "depth_encoding": model.depth_encoding}
    with open(os.path.join(data_dir, split, "codes.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return path


# -----------------------------------------------------------------------------
if __name__ == "__main__":
    # config: the fields of VQConfig and TrainConfig (the tiny preset is their defaults)
    globals().update({**asdict(VQConfig()), **asdict(TrainConfig())})
    from configurator import configure
    configure(globals(), section="vqgan", argv=[a for a in sys.argv[1:] if a != "--encode"])
    mc = VQConfig(**{f.name: globals()[f.name] for f in fields(VQConfig)})
    tc = TrainConfig(**{f.name: globals()[f.name] for f in fields(TrainConfig)})
    # -----------------------------------------------------------------------------
    data.prepare(tc.data_dir)  # the dataset, built with the tiny preset if missing
    if "--encode" in sys.argv[1:]:
        ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
        model = load_vqgan(ckpt_path)
        paths = {split: encode_split(model, tc.data_dir, split, ckpt_path) for split in data.SPLITS}
        final = {split: list(np.load(p, mmap_mode="r").shape) for split, p in paths.items()}
    else:
        final = train(tc, mc)
    print("final: " + json.dumps(final))
