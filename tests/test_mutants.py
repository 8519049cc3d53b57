"""The suite catches the bugs that matter: each plausible one-line error below (a swapped KL
direction, an inverted AW ratio, a misaligned lookup, ...) is applied to a copy of the
repository, and the test named next to it must fail there. A mutant that survives means
a test is missing."""
import importlib.util
import inspect
import shutil
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import distill
import forked
from test_distill import runs  # noqa: F401  (the teacher and SFT runs the loop's mutants share)

ROOT = Path(__file__).resolve().parent.parent

# (file, the correct line's text, the bug, the test that must catch it)
MUTANTS = {
    "token KL in the other direction": ("scd.py", "(log_p.exp() * (log_p - log_q))",
        "(log_q.exp() * (log_q - log_p))",
        "test_scd.py::test_token_kl_matches_torch_kl_div_and_is_zero_on_itself"),
    "forward and reverse distillation KL swapped": ("scd.py", 'if direction == "forward"',
        'if direction != "forward"',
        "test_scd.py::test_forward_kl_is_teacher_to_student_and_reverse_the_other_way"),
    "no temperature**2 factor": ("scd.py", "token_kl(p, q, temperature) * temperature ** 2",
        "token_kl(p, q, temperature)",
        "test_scd.py::test_temperature_softens_both_and_scales_by_its_square"),
    "temperature on one side only": ("scd.py", "log_q = F.log_softmax(q_logits.float() / temperature, -1)",
        "log_q = F.log_softmax(q_logits.float(), -1)",
        "test_scd.py::test_temperature_softens_both_and_scales_by_its_square"),
    "AW ratio inverted": ("scd.py", "torch.log(l_s) - torch.log(l_c)",
        "torch.log(l_c) - torch.log(l_s)",
        "test_scd.py::test_aw_weight_by_hand_and_constant"),
    "AW undefined at zero losses": ("scd.py", "anchor_loss.float().clamp_min(floor), ckpt_loss.float().clamp_min(floor)",
        "anchor_loss.float(), ckpt_loss.float()",
        "test_scd.py::test_aw_weight_is_defined_at_zero_and_tiny_losses"),
    "AW from the student's CE, not the checkpoint's": ("scd.py", "aw_weights(anchor_loss, gold_ce(teacher_logits, y, mask, chunk))",
        "aw_weights(anchor_loss, gold_ce(student_logits, y, mask, chunk))",
        "test_scd.py::test_distill_loss_by_hand_for_sft_fixed_alpha_and_aw"),
    "KL and CE weights swapped": ("scd.py", "(w * kl + (1 - w) * ce)",
        "(w * ce + (1 - w) * kl)",
        "test_scd.py::test_mixed_loss_weights_the_kl_by_w_and_the_ce_by_one_minus_w"),
    "distillation KL with teacher and student swapped": ("scd.py", "by_chunks(kl_fn, teacher_logits, student_logits, chunk=chunk)",
        "by_chunks(kl_fn, student_logits, teacher_logits, chunk=chunk)",
        "test_scd.py::test_distill_loss_by_hand_for_sft_fixed_alpha_and_aw"),
    "per-example mean over the whole batch": ("scd.py", "/ mask.sum(1).clamp(min=1)",
        "/ mask.sum().clamp(min=1)",
        "test_scd.py::test_per_example_mean_ignores_positions_outside_the_mask"),
    "schedule: KL(p_c || p_T*) instead of KL(p_T* || p_c)": ("scd.py", "token_kl(best_lp, ckpt_lp)",
        "token_kl(ckpt_lp, best_lp)",
        "test_scd.py::test_schedule_terms_and_argmin_by_hand"),
    "schedule: student-term directions swapped": ("scd.py", 'if student_term == "as_written"',
        'if student_term != "as_written"',
        "test_scd.py::test_schedule_terms_and_argmin_by_hand"),
    "schedule: argmax instead of argmin": ("scd.py", "int(score.argmin())",
        "int(score.argmax())",
        "test_scd.py::test_schedule_terms_and_argmin_by_hand"),
    "CD spacing floored": ("scd.py", "round(stage * best / (n_stages - 1))",
        "stage * best // (n_stages - 1)",
        "test_scd.py::test_kd_and_cd_schedules"),
    "CD spacing over K instead of K - 1": ("scd.py", "round(stage * best / (n_stages - 1))",
        "round(stage * best / n_stages)",
        "test_scd.py::test_kd_and_cd_schedules"),
    "T* by highest validation loss": ("scd.py", "return min(range(len(val_losses))",
        "return max(range(len(val_losses))",
        "test_scd.py::test_best_teacher_is_the_lowest_validation_loss_earliest_on_ties"),
    "T* by validation accuracy": ("train_teacher.py", 'scd.best_checkpoint([c["val_loss"]',
        'scd.best_checkpoint([c["val_acc"]',
        "test_train.py::test_manifest_lists_evenly_spaced_checkpoints_and_the_best"),
    "loss mask drops the answer's EOT": ("data.py", "mask[b, len(encoded[i][0]) - 1:n] = True",
        "mask[b, len(encoded[i][0]) - 1:n - 1] = True",
        "test_data.py::test_batch_mask_covers_answer_and_its_end_token_despite_eot_padding"),
    "loss mask takes in the last prompt token": ("data.py", "mask[b, len(encoded[i][0]) - 1:n] = True",
        "mask[b, len(encoded[i][0]) - 2:n] = True",
        "test_data.py::test_batch_mask_covers_answer_and_its_end_token_despite_eot_padding"),
    "AW anchor looked up by batch position": ("distill.py", "anchor[idx]",
        "anchor[:len(idx)]",
        "test_distill.py::test_aw_reads_each_examples_own_anchor_loss"),
    "exact match against the inputs, not the targets": ("data.py", "(lg.argmax(-1) != y[mask][r])",
        "(lg.argmax(-1) != x[mask][r])",
        "test_data.py::test_exact_match_without_decoding_needs_every_answer_token_and_the_end"),
    "padding rows in the vocabulary": ("data.py", "self.eot, self.vocab_size = 0, len(ids)",
        "self.eot, self.vocab_size = 0, -(-len(ids) // 64) * 64",
        "test_data.py::test_compact_vocabulary_round_trips_maps_unknown_ids_and_has_no_padding_rows"),
    "one LR schedule over all stages": ("distill.py", 'grp["lr"] = lr_at(i, cfg.steps_per_stage, cfg.lr, cfg.warmup_frac)',
        'grp["lr"] = lr_at(step, cfg.stages * cfg.steps_per_stage, cfg.lr, cfg.warmup_frac)',
        "test_plumbing.py::test_the_lr_schedule_restarts_at_every_stage"),
    "best.pt written after every stage": ("distill.py", 'if summary["acc"] >= best_val:',
        "if True:",
        "test_plumbing.py::test_best_pt_is_the_stage_with_the_best_validation_accuracy"),
    "AW anchor from the SFT student's last checkpoint": ("train_teacher.py", 'best = manifest["checkpoints"][manifest["best"]]',
        'best = manifest["checkpoints"][-1]',
        "test_plumbing.py::test_the_aw_anchor_comes_from_the_sft_students_best_checkpoint"),
    "teacher's probe drawn with another seed": ("train_teacher.py", "for s in data.probe_seeds(cfg.seed, cfg.probe_resamples,",
        "for s in data.probe_seeds(cfg.seed + 1, cfg.probe_resamples,",
        "test_plumbing.py::test_distill_reads_the_teachers_probe_only_if_it_holds_the_same_examples"),
    "teacher resumed without its random state": ("plumbing.py", '        torch.set_rng_state(state["rng"])\n',
        "",
        "test_train.py::test_a_teacher_with_dropout_interrupted_between_checkpoints_resumes_bit_for_bit"),
    "distillation resumed with its best score forgotten": ("plumbing.py", 'st["stage"], st["best_val"], read_json',
        'st["stage"], -1.0, read_json',
        "test_plumbing.py::test_a_run_interrupted_after_its_best_stage_keeps_that_stage_as_best"),
    "monotone against the first stage's choice": ("distill.py", 'prev = schedule[-1]["ckpt"] if schedule else None',
        'prev = schedule[0]["ckpt"] if schedule else None',
        "test_plumbing.py::test_monotone_compares_with_the_previous_stages_choice"),
    "--pool_start ignored": ("distill.py", 'pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"] <= t_star["step"]]',
        'pool = [c for c in ckpts if c["step"] <= t_star["step"]]',
        "test_plumbing.py::test_pool_start_drops_the_early_checkpoints_from_every_schedule"),
    "checkpoints after T* kept as candidates": ("distill.py", 'pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"] <= t_star["step"]]',
        'pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"]]',
        "test_plumbing.py::test_the_pool_is_the_path_to_t_star_even_when_the_teacher_peaks_first"),
    "distillation KL direction flag dropped": ("distill.py", "direction=cfg.kl_direction,",
        'direction="forward",',
        "test_plumbing.py::test_the_loss_gets_the_runs_alpha_direction_and_temperature"),
    "base loaded without its sha check": ("plumbing.py", "    if digest != sha:",
        "    if False:",
        "test_bases.py::test_a_changed_base_file_is_refused_with_its_sha"),
    "bases paired with any data": ("plumbing.py", 'if any(data.fingerprint(splits[s]) != data.fingerprint(default[s]) for s in ("val", "test")):',
        "if False:",
        "test_bases.py::test_bases_refuse_other_data_and_presets"),
    "an empty prompt's first token not a target": ("data.py", 'tok.encode(ex["prompt"]) or [tok.eot]',
        'tok.encode(ex["prompt"])',
        "test_bases.py::test_an_empty_prompt_makes_every_token_a_target"),
    "paper protocol: candidates from the second half": ("lab/reproduce.py", "return n, cfg.stage_epochs * steps_per_epoch, 0.0, epochs",
        "return n, cfg.stage_epochs * steps_per_epoch, 0.5, epochs",
        "test_bases.py::test_stage_protocols"),
    "distilled students start from random init": ("lab/reproduce.py", "probe_size=cfg.probe_size, lr=cfg.student_lr, init_from=starts(cfg)[1],",
        'probe_size=cfg.probe_size, lr=cfg.student_lr, init_from="",',
        "test_bases.py::test_each_phase_gets_its_base_protocol_and_budget"),
    "fp16: the clip before the unscale": ("distill.py",
        "    if scaler:\n        scaler.unscale_(optimizer)  # the clip below sees the true gradients\n"
        "    norm = scale.clip_grads(model, clip)\n",
        "    norm = scale.clip_grads(model, clip)\n    if scaler:\n        scaler.unscale_(optimizer)\n",
        "test_train.py::test_the_shared_step_clips_the_unscaled_gradients_and_counts_a_skipped_step"),
    "fp16: skipped steps counted the wrong way round": ("distill.py", "skipped = int(scaler.get_scale() < before)",
        "skipped = int(scaler.get_scale() >= before)",
        "test_train.py::test_the_shared_step_clips_the_unscaled_gradients_and_counts_a_skipped_step"),
    "--grad_clip 0 reaches the clip as a norm of zero": ("scale.py", 'max_norm if max_norm > 0 else float("inf")',
        "max_norm",
        "test_train.py::test_the_shared_step_clips_the_unscaled_gradients_and_counts_a_skipped_step"),
    "declared study: variants called on raw p < 0.05, not Holm": ("lab/choices.py",
        'stats.holm([rows[v, "SCD+AW"]["p"] for v in primary])',
        '[rows[v, "SCD+AW"]["p"] < 0.05 for v in primary]',
        "test_stats.py::test_the_choices_study_reads_best_validation_and_applies_its_declared_rule"),
    "reach: short of T* measured at the first stage": ("lab/reproduce.py", 'short=sched["best"] - picks[-1]',
        'short=sched["best"] - picks[0]',
        "test_reproduce.py::test_the_code_that_writes_the_reach_section_gives_the_committed_section"),
    "the refusal reads the training step alone": ("scale.py",
        "total, gib = max([sum(parts.values()) + held + buckets] + list(phases.values())),",
        "total, gib = sum(parts.values()),",
        "test_runs.py::test_the_refusal_reads_the_largest_phase_with_what_stays_alive_against_free_memory_less_the_margin"),
    "LoRA's B drawn at random, not zero": ("model.py", "self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank,",
        "self.lora_B = nn.Parameter(torch.randn(base.out_features, rank,",
        "test_lora.py::test_a_fresh_adapter_changes_nothing_and_only_adapters_train"),
    "LoRA merged without its alpha / r": ("model.py", "out.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)",
        "out.weight.copy_(self.base.weight + self.lora_B @ self.lora_A)",
        "test_lora.py::test_base_plus_adapter_gives_the_merged_weights_logits"),
}


def copy_with_mutant(name, dst):
    """A fresh copy of the repository in dst with one mutant applied; None, or what went wrong.
    The compiled modules come along (with their sources' times), except the mutated one's."""
    file, good, bad, tests = MUTANTS[name]
    for p in ROOT.iterdir():
        if p.suffix == ".py" or p.name in ("tests", "assets", "lab", "data", "report", "__pycache__"):  # report: the grid
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, dst / p.name)
    src = (ROOT / file).read_text(encoding="utf-8")
    if src.count(good) != 1:
        return f"{file} no longer has exactly one {good!r}: update the mutant"
    (dst / file).write_text(src.replace(good, bad), encoding="utf-8")
    for pyc in (dst / file).parent.glob(f"__pycache__/{Path(file).stem}.*"):
        pyc.unlink()
    return None


def in_the_loop(name):
    """A mutant of distill.py outside amp_step, the one function of it that train_teacher.py calls:
    the teacher and SFT runs of its test are the unmutated scripts' (test_distill's `runs`)."""
    file, good, _, _ = MUTANTS[name]
    return file == "distill.py" and good not in inspect.getsource(distill.amp_step)


# the control: with no mutant, a test of each module that reads the shared runs passes on them (the runs of another
# tiny_domain folder with the same examples are read as the module's own)
CONTROL = "no mutant: tests of the distillation loop on the shared runs"
CONTROL_TESTS = ("tests/test_distill.py::test_aw_reads_each_examples_own_anchor_loss",
                 "tests/test_plumbing.py::test_the_lr_schedule_restarts_at_every_stage")


def run_mutants(names, root, shared):
    """Every named mutant in its own copy under root, its test run there (tests/forked.py: two at
    a time, one thread each); a mutant in the distillation loop takes shared as its tests' teacher
    and SFT student -> {name: (pytest's exit code, the end of its output)}."""
    out, jobs = {}, []
    for n in names:
        dst = root / n.replace(" ", "_").replace("/", "_").replace("*", "star")
        dst.mkdir()
        error = copy_with_mutant(n, dst)
        if error:
            out[n] = (None, error)
        else:
            env = dict(SCD_TEST_THREADS=1, **(dict(SCD_TEST_RUNS=shared) if in_the_loop(n) else {}))
            jobs.append((n, forked.job(dst, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", f"tests/{MUTANTS[n][3]}",
                                       env=env)))
    jobs.insert(0, (CONTROL, forked.job(ROOT, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CONTROL_TESTS,
                                        env=dict(SCD_TEST_THREADS=1, SCD_TEST_RUNS=shared))))
    runs = forked.run([j for _, j in jobs])
    return out | {n: (code, (stdout + stderr)[-2000:]) for (n, _), (code, stdout, stderr) in zip(jobs, runs)}


PURE = "scd.py"  # pure functions, tested by plain functions: its mutants run in this process, with no start-up to pay


def run_here(name):
    """A mutant of scd.py checked in this process: the mutated source becomes the module `scd`
    that a fresh import of its test file sees, and its test is called. -> (1 if it failed, 0, message)."""
    file, good, bad, node = MUTANTS[name]
    test_file, test_name = node.split("::")
    src = (ROOT / file).read_text(encoding="utf-8")
    if src.count(good) != 1:
        return None, f"{file} no longer has exactly one {good!r}: update the mutant"
    mutant = types.ModuleType("scd")
    exec(compile(src.replace(good, bad), str(ROOT / file), "exec"), mutant.__dict__)
    real, sys.modules["scd"] = sys.modules.get("scd"), mutant
    try:
        spec = importlib.util.spec_from_file_location(f"mutant_of_{test_file[:-3]}", ROOT / "tests" / test_file)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        getattr(tests, test_name)()
        return 0, "the test passed"
    except Exception as e:  # an assertion, or anything else the bug raises
        return 1, f"{type(e).__name__}: {e}"[:2000]
    finally:
        if real is None:
            sys.modules.pop("scd")
        else:
            sys.modules["scd"] = real


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, runs):  # noqa: F811
    """Every mutant's run: those of other files in copies (run_mutants, in another process),
    scd.py's meanwhile in this process."""
    with ThreadPoolExecutor(1) as pool:
        others = [n for n in MUTANTS if MUTANTS[n][0] != PURE]
        copies = pool.submit(run_mutants, others, tmp_path_factory.mktemp("mutants"), runs)
        here = {n: run_here(n) for n in MUTANTS if MUTANTS[n][0] == PURE}
        return {**here, **copies.result()}


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_is_caught(name, outcomes):
    code, out = outcomes[name]
    assert code is not None, out
    assert code == 1, f"mutant {name!r} survived tests/{MUTANTS[name][3]}:\n{out}"


def test_without_a_mutant_the_loops_tests_pass_on_the_shared_runs(outcomes):
    """So a mutant of the loop is caught by its own doing, not by the runs it was given."""
    modules = {t.split("/")[1].split("::")[0] for t in CONTROL_TESTS}
    assert {MUTANTS[n][3].split("::")[0] for n in MUTANTS if in_the_loop(n)} <= modules  # each read where the control read
    code, out = outcomes[CONTROL]
    assert code == 0, out
