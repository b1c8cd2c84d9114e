"""Named presets of upstream training recipes, selected with `recipe: NAME` in a stage's YAML.

`RECIPES[name][stage]` is a config layer (keys of trainer/config.py DEFAULTS) that sits between
the defaults and the stage's files, so a file or `--set` still overrides any of it. Each value
says where upstream sets it; tests/test_recipes.py parses upstream's scripts and fails on drift.
"""
from __future__ import annotations

# MiniOneRec at commit 81b4ba9 (../shared/minionerec-upstream): sft.sh + sft.py, rl.sh + rl.py.
MINIONEREC_SFT = {
    "seed": 42,  # sft.sh --seed 42
    "data": {"max_prompt_len": 512},  # sft.py cutoff_len 512
    "sft": {
        "epochs": 10,  # sft.py num_epochs default
        "batch_size": 1024,  # sft.sh --batch_size 1024 (micro_batch_size 16 x accumulation: one update)
        "eval_every": 0.05,  # sft.py eval_step = 0.05: every 5% of the steps, as HF eval_steps < 1
        "checkpoint_every": 100,
        "best_metric": "valid/loss",  # load_best_model_at_end on eval_loss
        "early_stopping_patience": 3,  # EarlyStoppingCallback(early_stopping_patience=3)
        "eval_samples": None,  # the whole valid file
        # sft.py's datasets: SidSFTDataset, SidItemFeatDataset (title2sid + sid2title),
        # FusionSeqRecDataset, SFTData, TitleHistory2SidSFTDataset.
        "tasks": ["next_item", "title2sid", "sid2title", "sid_history2title", "title_history2title",
                  "title_history2sid"],
    },
    "train": {"optimizer": {
        "name": "adamw",  # optim="adamw_torch"
        "clip_norm": 1.0,  # HF TrainingArguments max_grad_norm default
        "weight_decay": 0.0,  # HF default
        # HF's default lr_scheduler_type "linear" with warmup_steps=20; learning_rate default 3e-4.
        "lr_schedule": {"type": "warmup_linear", "peak_value": 3e-4, "warmup_steps": 20, "warmup_ratio": 0.0,
                        "init_value": 0.0, "end_value": 0.0},
    }},
}

MINIONEREC_RL = {
    "seed": 42,  # rl.py seed default
    "data": {"max_prompt_len": 512},  # GRPOConfig max_prompt_length default
    "epochs": 2,  # rl.sh --num_train_epochs 2
    # rl.sh: 64 completions per device x 8 processes = 32 prompts of 16 per generation batch, and
    # --gradient_accumulation_steps 2: one optimizer step sees 64 prompts (our step = one update).
    "rollout": {"batch_size": 64, "n": 16, "mode": "beam", "temperature": 1.0, "max_length_sample": 128},
    "rl": {
        "kl_coef": 1e-3,  # rl.sh --beta 1e-3
        "reward": "ranking",  # rl.sh --reward_type ranking (rule + NDCG-style penalty)
        "updates_per_rollout": 1,  # GRPO of this trainer: one update per generation (ratio 1)
        "adv_eps": 1e-4,  # minionerec_trainer: (r - mean) / (std + 1e-4)
        # rl.py: SidDataset + RLTitle2SidDataset + RLSeqTitle2SidDataset(sample=10000).
        "tasks": ["rl_next_item", "rl_title2sid", "rl_seq_title2sid"],
        "sync_ref_model": True,  # rl.sh --sync_ref_model True; alpha and steps: GRPOConfig defaults
        "ref_model_mixup_alpha": 0.6,
        "ref_model_sync_steps": 512,
    },
    "train": {"optimizer": {
        "name": "adamw",  # optim="paged_adamw_32bit": AdamW, betas (0.9, 0.999), eps 1e-8
        "clip_norm": 0.3,  # max_grad_norm=0.3
        "weight_decay": 0.0,  # HF default
        "lr_schedule": {"type": "warmup_cosine", "peak_value": 1e-5, "warmup_ratio": 0.03, "warmup_steps": None,
                        "init_value": 0.0, "end_value": 0.0},  # lr 1e-5, cosine, warmup_ratio=0.03
    }},
}

RECIPES: dict[str, dict[str, dict]] = {
    "minionerec": {"sft": MINIONEREC_SFT, "rl": MINIONEREC_RL},
}
