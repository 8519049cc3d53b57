"""
The base models: a teacher base and a student base pretrained on general text, so that the
domain SFT is fine-tuning, as in the paper (METHOD.md section 6). Not part of the main
command: the two files it makes are committed in assets/, and the runs start from them
with --init_from base.

    python -m lab.pretrain        # remakes assets/base_teacher.pt and assets/base_student.pt (~7 min on 2 cores)

The corpus (domains.corpus) is prose about the default world and generic text in the tasks'
shapes about other content; pretraining is the ordinary trainer on it with every token a
target. The vocabulary is the corpus's and the default domain's training split's (the domain
adds its prompt words and labels, which the bases never see). Both bases share it, so teacher
and student can be compared token by token. After a remake, paste the printed sha256 lines
into plumbing.BASES: every run checks the file it loads against them.
"""
import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import train_teacher as tt
from lab import domains
from plumbing import arg, atomic_save, parse_config, read_json, run_main
from plumbing import BASES
from model import GPT, GPTConfig, PRESETS


@dataclass
class PretrainConfig:
    out_dir: str = arg("runs/pretrain", "where the two pretraining runs go")
    epochs: int = arg(6, "passes over the corpus (7,200 documents, 164k tokens)", low=1)
    teacher_lr: float = arg(3e-3, "the teacher base's peak learning rate", low=0)
    student_lr: float = arg(6e-3, "the student base's peak learning rate", low=0)
    seed: int = arg(0, "seed of the init and the data order")
    install: bool = arg(True, "copy the best checkpoints to assets/ as the committed bases")


def main(cfg):
    corpus, domain = domains.corpus(), data.load_domain("default")
    tok = data.Tokenizer.compact([ex["prompt"] + ex["answer"] for ex in corpus["train"] + domain["train"]])
    for preset, lr in (("teacher", cfg.teacher_lr), ("student", cfg.student_lr)):
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(**{**PRESETS[preset], "vocab_size": tok.vocab_size}))
        init = f"{cfg.out_dir}/init_{preset}.pt"  # a random init with the shared vocabulary
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_save(dict(model=model.state_dict(), model_config=asdict(model.config), vocab=tok.ids), init)
        run = f"{cfg.out_dir}/{preset}"
        tt.train(tt.TrainConfig(data="corpus", preset=preset, init_from=init, out_dir=run, epochs=cfg.epochs, lr=lr,
                                ckpt_per_epoch=1, probe_size=16, seed=cfg.seed), corpus)
        manifest = read_json(f"{run}/manifest.json")
        best = manifest["checkpoints"][manifest["best"]]
        print(f"{preset} base: {model.num_params() / 1e6:.3f}M parameters, best corpus val loss {best['val_loss']:.4f} "
              f"(epoch {best['epoch']})")
        if cfg.install:
            path = BASES[preset][0]
            shutil.copyfile(f"{run}/{best['file']}", path)
            print(f'    "{preset}": (ASSETS / "{path.name}", "{hashlib.sha256(path.read_bytes()).hexdigest()}"),')


if __name__ == "__main__":
    run_main(main, parse_config(PretrainConfig, "Pretrain the teacher and student bases on the general corpus."))
