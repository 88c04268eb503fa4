"""Crash test: SIGKILL a small training run at many random moments, resume it each time, and
compare its final parameters with an uninterrupted run.

  python tests/crash_test.py [--kills=20] [--workdir=runs/crash_test] [--seed=0]

The run is `kdjax.main` on the quickstart-sized from-scratch config (BERT teacher stage, then
a CNN student distilled from it) with a checkpoint every 5 steps. Kills alternate between:
- `write`: while the 1st, 2nd or 3rd checkpoint save of the attempt is in flight (an orbax `*.orbax-checkpoint-tmp*`
  folder exists), the case atomic saves exist for;
- `random`: a uniform random delay after the attempt has started training (or, for some,
  after the process started at all: imports, data preparation, compilation, export).
The first half of the kills land in the teacher stage, the rest in the distill stage. After
`--kills` kills the run is left to finish. The exports of both stages are compared
bit for bit with the uninterrupted reference, and so are the reported accuracies. Prints
one line per attempt and a summary; writes `<workdir>/crash_test.json`. Exit status 1 on any
mismatch or failed resume.
"""

import argparse
import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdjax import checkpoint  # noqa: E402
from tests.tiny_run import main_command  # noqa: E402


def command(workdir: pathlib.Path, steps: int) -> list[str]:
  return main_command(
    workdir,
    f'--config.train.teacher_steps={steps}',
    f'--config.train.student_steps={steps}',
    '--config.train.log_every=5',
    '--config.train.checkpoint_every=5',
    '--config.train.eval_every=0',
  )


def saves_in_flight(workdir: pathlib.Path, since: float = 0.0, stage: str = '*') -> set[str]:
  """orbax save folders that exist now and were created after `since` (a killed attempt
  may leave a stale one behind, which the next attempt's manager removes)."""
  found = set()
  for tmp in workdir.glob(f'{stage}/checkpoints/*.orbax-checkpoint-tmp*'):
    try:
      if tmp.stat().st_mtime >= since:
        found.add(str(tmp.relative_to(workdir)))
    except FileNotFoundError:  # renamed into place while we looked
      continue
  return found


def attempt(workdir, steps, mode, rng, log_path, stage='teacher') -> dict:
  """Starts the run, kills it per `mode` (or lets it finish: mode 'finish') once `stage`
  is training (the teacher stage, or the distill stage after the teacher's export)."""
  log_start = log_path.stat().st_size if log_path.exists() else 0
  with log_path.open('a') as log:
    proc = subprocess.Popen(command(workdir, steps), cwd=REPO, stdout=log, stderr=log)
  start = time.time()
  event = {'mode': mode, 'stage': stage}
  if mode == 'finish':
    proc.wait(timeout=1800)
    event.update(returncode=proc.returncode, seconds=time.time() - start)
    return event

  def new_output() -> str:
    with log_path.open() as f:
      f.seek(log_start)
      return f.read()

  started_training = False
  delay = rng.uniform(0.0, 6.0)
  # Kill during the n-th save of this attempt, so attempts also make progress between kills.
  saves_to_pass, seen = rng.randint(1, 3), set()
  early = mode == 'random' and rng.random() < 0.25  # some kills land before training starts
  deadline = start + (rng.uniform(0.5, 12.0) if early else 600)
  while proc.poll() is None and time.time() < deadline:
    if mode == 'write':
      seen |= saves_in_flight(workdir, since=start, stage=stage)
      if len(seen) >= saves_to_pass and saves_in_flight(workdir, since=start, stage=stage):
        break
    if mode == 'random' and not early and not started_training:
      text = new_output()
      if f'[{stage}] step ' in text or f'[{stage}] resumed from step' in text:
        started_training, deadline = True, time.time() + delay
    time.sleep(0.005)
  if proc.poll() is not None:  # it finished (or failed) before the kill
    event.update(returncode=proc.returncode, killed=False, seconds=time.time() - start)
    return event
  during_write = bool(saves_in_flight(workdir, since=start))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  event.update(killed=True, during_write=during_write, seconds=round(time.time() - start, 2))
  event['newest_checkpoint'] = {
    stage.name: max(
      (int(p.name) for p in (stage / 'checkpoints').iterdir() if p.name.isdigit()), default=0
    )
    for stage in sorted(workdir.iterdir())
    if (stage / 'checkpoints').is_dir()
  }
  return event


def compare(reference: pathlib.Path, crashed: pathlib.Path) -> list[str]:
  mismatches = []
  for stage, role in (('teacher', 'teacher'), ('distill', 'student')):
    a = checkpoint.load_export_params(reference / stage / 'export' / role)
    b = checkpoint.load_export_params(crashed / stage / 'export' / role)
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    differing = sum(not np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
    if differing or len(leaves_a) != len(leaves_b):
      mismatches.append(f'{stage}/{role}: {differing} of {len(leaves_a)} tensors differ')
  want = json.loads((reference / 'results.json').read_text())['summary']
  got = json.loads((crashed / 'results.json').read_text())['summary']
  if want != got:
    mismatches.append(f'summary differs: {want} vs {got}')
  return mismatches


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--kills', type=int, default=20)
  parser.add_argument('--steps', type=int, default=150, help='steps of each stage')
  parser.add_argument('--workdir', default='runs/crash_test')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  root = pathlib.Path(args.workdir).absolute()
  if root.exists():
    shutil.rmtree(root)
  root.mkdir(parents=True)
  rng = random.Random(args.seed)

  start = time.time()
  reference = root / 'reference'
  ref = attempt(reference, args.steps, 'finish', rng, root / 'reference.log')
  if ref['returncode'] != 0:
    sys.exit(f'the uninterrupted run failed (see {root / "reference.log"})')
  print(f'reference run: {ref["seconds"]:.0f} s', flush=True)

  crashed = root / 'crashed'
  events = []
  while sum(e.get('killed', False) for e in events) < args.kills:
    mode = 'write' if len(events) % 2 == 0 else 'random'
    # The first half of the kills hit the teacher stage, the rest the distill stage (its
    # first attempt finishes the teacher, exports it and fills the teacher cache first).
    stage = 'teacher' if len(events) < args.kills // 2 else 'distill'
    event = attempt(crashed, args.steps, mode, rng, root / 'crashed.log', stage)
    events.append(event)
    print(f'attempt {len(events)}: {json.dumps(event)}', flush=True)
    if not event.get('killed'):
      if event['returncode'] != 0:
        sys.exit(f'a resumed attempt failed with exit {event["returncode"]} ({root}/crashed.log)')
      break  # finished before reaching the kill count: fewer steps were left than kills
  final = attempt(crashed, args.steps, 'finish', rng, root / 'crashed.log')
  events.append(final)
  print(f'final attempt: {json.dumps(final)}', flush=True)
  mismatches = compare(reference, crashed) if final['returncode'] == 0 else ['final run failed']
  kills = [e for e in events if e.get('killed')]
  summary = {
    'kills': len(kills),
    'kills_during_checkpoint_writes': sum(e['during_write'] for e in kills),
    'resumes_survived': len(kills) if final['returncode'] == 0 else 0,
    'mismatches': mismatches,
    'attempts': events,
    'wall_seconds': time.time() - start,
  }
  (root / 'crash_test.json').write_text(json.dumps(summary, indent=2))
  print(
    f'{summary["kills"]} SIGKILLs ({summary["kills_during_checkpoint_writes"]} during checkpoint '
    f'writes), {summary["resumes_survived"]} survived, {len(mismatches)} mismatches '
    f'{mismatches or ""}; {summary["wall_seconds"]:.0f} s'
  )
  sys.exit(1 if mismatches or len(kills) < args.kills else 0)


if __name__ == '__main__':
  main()
