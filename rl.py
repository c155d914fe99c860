"""
Stage 2b (COOPER §3.2): reinforcement learning with GRPO and the CPR reward. The SFT model learns
to use its own perception (drawing a depth or segmentation map into its context) where it pays.

One iteration of the training loop (trainer.train, the same loop every stage uses):
  1. rollouts: for each of a few train questions, G = group_size replies at temperature 1 through
     the one sampler (sampler.generate) with the tool loop on, so maps the model draws re-enter
     its context; each token comes back marked sampled or forced, with its log-prob;
  2. rewards, the CPR reward, each part a small pure function:
       accuracy     rule-based, metrics.score_answer of the final <answer>: exact match for choices,
                    yes/no and counts; numbers parsed with their unit and scored by MRA, the
                    fraction of the relative-error thresholds 0.05, 0.10, …, 0.50 the answer is
                    within (1 for < 5 % off, 0.5 for 25–30 % off, 0 beyond 50 %), so the reward is
                    exactly the held-out metric;
       format       1 if tokenizer.parse_reply accepts the reply (every turn but the last is
                    <think>…</think> plus one complete tool call with its map, the last is
                    <think>…</think><answer>…</answer>, then <|eos|> and nothing else), else 0;
       exploration  per group: fewer than k rollouts used a tool and the question's tool flag is
                    positive -> each tool user gets +bonus; more than k used one and the flag is
                    negative -> each tool user gets -bonus (k = 3 of 8, bonus 0.2);
     r = accuracy_weight·accuracy + format_weight·format + explore_weight·exploration;
  3. GRPO: advantages (r − mean)/(std + ε) within each group (0 for a group whose rewards are all
     equal); per-token ratio π/π_old clipped to 1 ± clip_eps (it only bites when ppo_epochs > 1
     reuses a batch); an optional k3 KL to the frozen SFT model (kl_beta = 0, as in the paper);
     the loss is averaged over all trained tokens of the batch (token-level normalisation). Only
     sampled text tokens are trained: forced tokens (the reflection prompt, <|image|> after a tool
     call, <|/image|>) never, and the map codes the model drew only with rl_image_tokens=True, an
     extension the paper leaves open.

The sampler's log-probs are the model's own at temperature 1 before the grammar's masks, exactly
what a forward pass gives, so they serve as π_old. Rollouts are drawn with the rng the loop passes
to get_batch (per rank under DDP), so resuming a run continues it exactly.

    python rl.py                              # the COOPER arm from out/stage2/ckpt.pt
    python rl.py --tools=none                 # the RE arm: text-only RL from out/stage2_text/ckpt.pt
    python rl.py config/tiny_cpu.py --seed=2  # (the preset's `rl` dict sizes the tiny run)
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import batches
import conversations
import data
import eval as ev
import metrics
import prepare
import sampler
import trainer
from configurator import configure

# -----------------------------------------------------------------------------
# I/O: RL starts from an SFT checkpoint (the model's shape comes from it)
out_dir = ""  # "": out/rl, or out/rl_text with --tools=none
init_from = ""  # "": the arm's SFT checkpoint (SFT_CHECKPOINTS); or resume, or a path
data_dir = "data/tiny"
vq_ckpt = "out/vqgan/ckpt.pt"
seed = 1337
device = "auto"  # auto: cuda if available, else cpu
compile = False  # torch.compile the model (CUDA)
attn_impl = "auto"  # auto: triton on CUDA, sdpa otherwise
tools = "all"  # all: interleaved rollouts that may draw depth/seg maps; none: text-only (the RE arm)
# rollouts: an iteration is grad_accum micro-batches of prompts_per_batch questions × group_size replies
prompts_per_batch = 2
group_size = 8
temperature = 1.0
max_new_tokens = 768
# the CPR reward
accuracy_weight = 1.0
format_weight = 1.0
explore_weight = 1.0
explore_k = 3  # fewer tool users than this in a group: bonus on positive questions; more: penalty on negative
explore_bonus = 0.2
# GRPO
ppo_epochs = 1  # optimizer steps on each batch of rollouts
clip_eps = 0.2
kl_beta = 0.0  # > 0: k3 KL to the frozen initial model
adv_eps = 1e-4
rl_image_tokens = False  # also train the map codes the policy sampled
# held-out evaluation: replies (eval.DECODE: text greedy, maps sampled) to a fixed balanced sample
# of val questions, and the mean reward and accuracy of group_size sampled replies to each of a
# fixed few of them (same seed every time)
eval_questions = 70
eval_reward_questions = 14
# optimisation: one optimizer step per iteration (ppo_epochs more on the same rollouts)
max_iters = 100
grad_accum = 1
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
optimizer = "adamw"  # or "muon": Muon for the blocks' matrices at muon_lr (optim.Muon)
muon_lr = 0.02
# logging
log_interval = 1
eval_interval = 50
eval_iters = 0  # no val loss: RL is judged by held-out accuracy
peak_tflops = 0.0  # what MFU is measured against; 0: measure (CPU) or look up (GPU)
# -----------------------------------------------------------------------------
SFT_CHECKPOINTS = {"all": "out/stage2/ckpt.pt", "none": "out/stage2_text/ckpt.pt"}
OUT_DIRS = {"all": "out/rl", "none": "out/rl_text"}


# --- the CPR reward ------------------------------------------------------------------------------
def accuracy_reward(tok, q, reply):
    """Rule-based correctness of the reply's final answer in [0, 1]: metrics.score_answer, so 0/1 for
    choices, yes/no and counts and MRA for numbers (see the module docstring). A reply that breaks
    the format still earns this if it states an answer: format is its own component."""
    parts, _ = tok.parse_reply(reply)
    return metrics.score_answer(q, tok.answer_of(parts))


def format_reward(tok, reply):
    """1 if the reply is a well-formed interleaved reply (the parser stage 2's traces pass), else 0."""
    return float(tok.parse_reply(reply)[1] is None)


def used_tool(tok, reply):
    """Whether the reply called depth estimation or segmentation."""
    return any("tool" in p for p in tok.parse_reply(reply)[0])


def tool_positive(q):
    """The question's tool flag (data.TOOL_FOR): depth or seg = tools are expected to help."""
    return q["tool"] != "none"


def exploration_reward(used, positive, k=3, bonus=0.2):
    """CPR's exploration-guided term for one group of rollouts of one question. used: whether each
    rollout called a tool; positive: the question's flag. Pushes the tool-use rate toward k of G
    only in the direction the flag says is right: a rare tool user on a question that needs a tool
    is encouraged, a common tool user on a question that does not is discouraged."""
    n = sum(used)
    if n < k and positive:
        return [bonus * u for u in used]
    if n > k and not positive:
        return [-bonus * u for u in used]
    return [0.0] * len(used)


def cpr_rewards(tok, questions, replies, group_size, weights=(1.0, 1.0, 1.0), k=3, bonus=0.2):
    """Rewards of consecutive groups of group_size replies, replies[i] answering questions[i].
    Returns {component: float tensor (len(replies),)} with accuracy, format, explore, tool (0/1)
    and reward = the weighted sum."""
    acc = [accuracy_reward(tok, q, r) for q, r in zip(questions, replies)]
    fmt = [format_reward(tok, r) for r in replies]
    used = [used_tool(tok, r) for r in replies]
    explore = []
    for g in range(0, len(replies), group_size):
        explore += exploration_reward(used[g:g + group_size], tool_positive(questions[g]), k, bonus)
    out = {name: torch.tensor(v, dtype=torch.float32) for name, v in
           (("accuracy", acc), ("format", fmt), ("explore", explore), ("tool", used))}
    w_acc, w_fmt, w_exp = weights
    out["reward"] = w_acc * out["accuracy"] + w_fmt * out["format"] + w_exp * out["explore"]
    return out


# --- GRPO ----------------------------------------------------------------------------------------
def group_advantages(rewards, group_size, eps=1e-4):
    """(r − mean) / (std + eps) within each consecutive group of group_size (the unbiased std, as
    in GRPO implementations); a group whose rewards are all equal carries no signal and gets 0."""
    r = rewards.view(-1, group_size)
    std = r.std(dim=1, keepdim=True)
    adv = (r - r.mean(dim=1, keepdim=True)) / (std + eps)
    return torch.where(std > 1e-6, adv, torch.zeros_like(adv)).flatten()


def rollout_tensors(tok, prompts, gen, train_images):
    """Prompts and their replies -> (idx, targets, loss_mask, old_logprobs), right-padded (B, T).
    targets[b, t] is token t+1 of row b; loss_mask is 1 on the reply tokens the policy sampled
    (image codes only if train_images); old_logprobs are the sampler's, aligned with targets."""
    rows = [p + gen.row(b) for b, p in enumerate(prompts)]
    T = max(len(r) for r in rows) - 1
    B = len(rows)
    x = torch.full((B, T + 1), tok.pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    old = torch.zeros((B, T))
    for b, (p, r) in enumerate(zip(prompts, rows)):
        x[b, :len(r)] = torch.tensor(r)
        n = int(gen.lengths[b])
        # reply token i is row token len(p) + i, i.e. target position len(p) - 1 + i
        mask[b, len(p) - 1:len(p) - 1 + n] = gen.sampled_mask[b, :n]
        old[b, len(p) - 1:len(p) - 1 + n] = gen.logprobs[b, :n]
    idx, targets = x[:, :-1], x[:, 1:]
    if not train_images:
        mask = mask * (targets < tok.image_offset)
    return idx, targets, mask, old * mask


@torch.no_grad()
def rollouts(model, tok, picked, codes, n_image_tokens, cfg, seed, rgb=None):
    """group_size replies to each question of `picked` by the current policy, scored; rgb, the
    split's pictures, for a model that reads them (eval.answer's).
    Returns (questions, prompts, Generation, rewards (cpr_rewards), stats {name: float}), one row a reply."""
    G = cfg["group_size"]
    qs = [q for q in picked for _ in range(G)]
    prompts = [tok.render_prompt(conversations.vqa_conversation(q, answer=False), batches.scene_codes(codes, q["scene"])) for q in qs]
    was_training = model.training
    model.eval()
    gen = sampler.generate(model, tok, prompts, cfg["max_new_tokens"], n_image_tokens, temperature=cfg["temperature"],
                           seed=seed, tools=cfg["tools"] == "all", rgb=batches.scene_pictures(rgb, qs))
    model.train(was_training)
    r = cpr_rewards(tok, qs, [gen.row(b) for b in range(len(qs))], G,
                    (cfg["accuracy_weight"], cfg["format_weight"], cfg["explore_weight"]), cfg["explore_k"], cfg["explore_bonus"])
    positive = torch.tensor([tool_positive(q) for q in qs])
    stats = {
        "reward": r["reward"].mean().item(), "r_accuracy": r["accuracy"].mean().item(),
        "r_format": r["format"].mean().item(), "r_explore": r["explore"].mean().item(),
        "tool_rate": r["tool"].mean().item(),
        # tool use where the flag says it helps, and where it says it does not (0 if there are none)
        "tool_rate_pos": r["tool"][positive].mean().item() if positive.any() else 0.0,
        "tool_rate_neg": r["tool"][~positive].mean().item() if (~positive).any() else 0.0,
        "length": gen.lengths.float().mean().item(),
        "flat_groups": (r["reward"].view(-1, G).std(dim=1) <= 1e-6).float().mean().item(),  # groups with no signal
    }
    return qs, prompts, gen, r, stats


@torch.no_grad()
def rollout_batch(model, tok, questions, codes, n_image_tokens, rng, cfg, ref_model=None, rgb=None):
    """One micro-batch for the GRPO loss: cfg["prompts_per_batch"] questions drawn with rng, each
    answered cfg["group_size"] times by the current policy, scored and turned into tensors.
    Returns (idx, targets, loss_mask, extra) with extra = {advantages (B,), old_logprobs (B, T),
    [ref_logprobs (B, T)], [rgb, each row's picture, given the split's], stats {name: float}}."""
    picked = [questions[i] for i in rng.integers(len(questions), size=cfg["prompts_per_batch"])]
    qs, prompts, gen, r, stats = rollouts(model, tok, picked, codes, n_image_tokens, cfg, int(rng.integers(2 ** 62)), rgb)
    idx, targets, mask, old = rollout_tensors(tok, prompts, gen, cfg["rl_image_tokens"])
    adv = group_advantages(r["reward"], cfg["group_size"], cfg["adv_eps"])
    # a group whose rollouts all scored the same has advantage 0 everywhere: no gradient, so it is
    # left out of the batch (DAPO's dynamic sampling, without resampling) and costs no compute
    keep = adv != 0
    trained = torch.nonzero(mask[keep].sum(0))
    T = int(trained[-1]) + 1 if len(trained) else 1  # causal: positions after the last trained one change nothing
    idx, targets, mask, old = idx[keep, :T], targets[keep, :T], mask[keep, :T], old[keep, :T]
    stats["trained_rows"] = float(keep.sum())
    extra = {"advantages": adv[keep], "old_logprobs": old, "stats": stats}
    if rgb is not None:
        extra["rgb"] = batches.scene_pictures(rgb, qs)[keep]
    if ref_model is not None:
        extra["ref_logprobs"] = ref_model.token_logprobs(idx, targets, extra.get("rgb")) * mask
    return idx, targets, mask, extra


def grpo_loss(model, batch, clip_eps=0.2, kl_beta=0.0):
    """The clipped GRPO objective over one batch of rollouts -> (loss, stats). Calls model(idx)
    (not model.token_logprobs) so that under DDP the forward goes through the wrapper and the
    gradients are synchronised. Only the trained positions (loss_mask 1) reach the head and the
    softmax (GPT.forward with a mask): the rest (prompt, forced tokens, padding) get neither loss
    nor gradient, and cost nothing there."""
    idx, targets, mask, extra = batch
    logits, _ = model(idx, loss_mask=mask, rgb=extra.get("rgb"))  # (n, V) over the n trained tokens
    trained = mask.bool()
    logp_all = F.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(1, targets[trained][:, None]).squeeze(1)  # = model.token_logprobs there
    n = max(1, len(logp))
    ratio = torch.exp(logp - extra["old_logprobs"][trained])
    adv = extra["advantages"][:, None].expand_as(mask)[trained]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    stats = dict(extra.get("stats", {}))
    if kl_beta > 0:
        # k3 estimator of KL(π || π_ref): unbiased, always ≥ 0 (Schulman, "Approximating KL")
        d = extra["ref_logprobs"][trained] - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_beta * kl
        stats["kl"] = kl.sum().item() / n
    loss = per_token.sum() / n  # token-level: every trained token of the batch weighs the same
    with torch.no_grad():
        stats["entropy"] = -(logp_all.exp() * logp_all).sum().item() / n
        stats["clip_frac"] = ((ratio - 1).abs() > clip_eps).sum().item() / n
    return loss, stats


# --- held-out evaluation -------------------------------------------------------------------------
@torch.no_grad()
def heldout_metrics(model, tok, questions, codes, n_image_tokens, tools, rgb=None):
    """Greedy replies to fixed val questions through eval.answer's interleaved mode (stage 2's
    evaluation, so the numbers compare): accuracy per category and their mean (vqa_acc), format
    validity and tool use (metrics.tool_use), the tool-use rate on positive and negative questions,
    and each question's score (scores, a list). rgb: as for eval.answer."""
    replies = ev.answer(model, tok, questions, codes, n_image_tokens, mode="interleaved", tools=tools == "all", rgb=rgb,
                        **ev.DECODE)
    use = metrics.tool_use(tok, questions, replies)  # (its per-category breakdown is eval.py's report)
    out = {**metrics.vqa_accuracy(tok, questions, replies), "format_valid": use["format_valid"], "tool_pattern": use["tool_pattern"]}
    out["scores"] = [s["score"] for s in metrics.question_scores(tok, questions, replies)]  # per question, for paired comparisons
    used = np.array([used_tool(tok, r) for r in replies], dtype=float)
    pos = np.array([tool_positive(q) for q in questions])
    out["tool_rate"] = float(used.mean())
    out["tool_rate_pos"] = float(used[pos].mean()) if pos.any() else 0.0
    out["tool_rate_neg"] = float(used[~pos].mean()) if (~pos).any() else 0.0
    out["length"] = float(np.mean([len(r) for r in replies]))
    return out


if __name__ == "__main__":
    config = configure(globals(), section="rl")  # config/*.py and --key=value; bad keys stop here
    if tools not in SFT_CHECKPOINTS:
        raise SystemExit(f"config error: tools={tools!r}: expected one of {sorted(SFT_CHECKPOINTS)}")
    config["out_dir"] = out_dir = out_dir or OUT_DIRS[tools]
    config["init_from"] = init_from = init_from or SFT_CHECKPOINTS[tools]
    config["batch_size"] = prompts_per_batch * group_size  # rollouts per micro-batch (what the loop logs)
    t_start = time.time()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"RL, {'COOPER' if tools == 'all' else 'RE'} arm (tools={tools}): {init_from} -> {out_dir}")
    if init_from not in ("scratch", "resume") and not os.path.exists(init_from):
        raise SystemExit(f"SFT checkpoint {init_from} is missing: train it first (python train_stage2.py"
                         f"{' --tools=none' if tools == 'none' else ''}, or bash runs/tiny_cpu.sh for the whole pipeline)")
    run = trainer.setup_run(device)
    torch.manual_seed(seed)
    tok, vq, codes, questions, refs = prepare.stage_data(data_dir, vq_ckpt)
    n_image = codes["train"].shape[-1]
    model, optimizer, start = trainer.init_model(config, run, tok, n_image)
    # the reference for the KL term is the model RL started from, also after a resume
    reference = trainer.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["refs"]["reference"] \
        if init_from == "resume" else init_from
    ref_model = trainer.load_model(reference, run.device)[0] if kl_beta > 0 else None
    eval_qs = ev.balanced_sample(questions["val"], eval_questions)
    reward_qs = ev.balanced_sample(questions["val"], eval_reward_questions, seed=1)
    rgb = {s: data.load_split(data_dir, s)["rgb"] for s in ("train", "val")} if model.config.reader_pixels else {}

    def get_batch(split, rng):
        return rollout_batch(model, tok, questions[split], codes[split], n_image, rng, config, ref_model, rgb.get(split))

    def loss_fn(model, batch):
        return grpo_loss(model, batch, clip_eps, kl_beta)

    scores_path = os.path.join(out_dir, "heldout_scores.jsonl")  # per question, each evaluation: for paired changes
    if run.master:
        os.makedirs(out_dir, exist_ok=True)

    def evaluate(model, it):
        model.eval()
        scores = heldout_metrics(model, tok, eval_qs, codes["val"], n_image, tools, rgb.get("val"))
        with open(scores_path, "a") as f:
            f.write(json.dumps({"iter": it, "scores": scores.pop("scores")}) + "\n")
        if reward_qs:
            sampled = rollouts(model, tok, reward_qs, codes["val"], n_image, config, seed, rgb.get("val"))[4]
            scores["reward"], scores["sampled_acc"] = sampled["reward"], sampled["r_accuracy"]
        model.train()
        return {k if k.startswith("acc_") else f"heldout_{k}": v for k, v in scores.items()}

    start_path = os.path.join(out_dir, "eval_start.json")
    if run.master and start["iter"] == 0:  # the starting point of the curves (the loop evaluates after steps)
        if os.path.exists(scores_path):
            os.remove(scores_path)  # a fresh run: no scores from an earlier one
        record = {"iter": 0, **evaluate(model, 0)}
        print("eval " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        with open(start_path, "w") as f:
            json.dump(record, f)
    last = trainer.train(config, run, model, optimizer, start, get_batch, evaluate if run.master else None,
                         refs=dict(refs, stage="rl" if tools == "all" else "rl_text", reference=reference),
                         loss_fn=loss_fn, steps_per_batch=ppo_epochs)
    if run.ddp:
        torch.distributed.destroy_process_group()
    if run.master:
        records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
        rewards = [r["reward"] for r in records if "reward" in r]
        n = max(1, len(rewards) // 5)  # rewards of single iterations are noisy: average a fifth of the run
        start_record = json.load(open(start_path)) if os.path.exists(start_path) else {}  # written at iteration 0
        # reward_*: the mean CPR reward of group_size sampled replies to the same val questions with
        # the same seed, before and after, and sampled_acc_* their accuracy; train_reward_*: the
        # rollouts' reward over the first and last fifth of the run (other questions every
        # iteration, so noisier)
        final = {"reward_start": start_record.get("heldout_reward"), "reward_end": last.get("heldout_reward"),
                 "acc_start": start_record.get("heldout_vqa_acc"), "acc_end": last["heldout_vqa_acc"],
                 "sampled_acc_start": start_record.get("heldout_sampled_acc"), "sampled_acc_end": last.get("heldout_sampled_acc"),
                 "train_reward_start": float(np.mean(rewards[:n])), "train_reward_end": float(np.mean(rewards[-n:])),
                 "tool_rate_start": start_record.get("heldout_tool_rate"), "tool_rate_end": last["heldout_tool_rate"],
                 "format_start": start_record.get("heldout_format_valid"), "format_end": last["heldout_format_valid"]}
        # the change in held-out accuracy over the run, paired by question
        # (a run resumed from one that predates the file has none)
        by_iter = {r["iter"]: r["scores"] for r in map(json.loads, open(scores_path))} if os.path.exists(scores_path) else {}
        if 0 in by_iter and len(by_iter) > 1:
            final.update(metrics.paired_change(by_iter[0], by_iter[max(by_iter)]))
        final = {k: round(v, 4) if isinstance(v, float) else v for k, v in final.items()}
        final.update({k: round(v, 4) for k, v in last.items() if k.startswith("acc_")})
        final["minutes"] = round((time.time() - t_start) / 60, 2)
        print("final: " + json.dumps(final))
