"""Temperature × KL-weight ablation of Hinton distillation, MiniLM teacher → BiLSTM, 3 seeds.

  python -m kdjax.sweep --config=experiments/sst2_kd_sweep.py --workdir=runs/kd_sweep
  (add --parallel=2 on a machine with spare cores; --config=...:teacher=<workdir> for
  another teacher run, default runs/minilm_teacher)

The student is experiments/sst2_minilm_students.py's BiLSTM (initialised from a PCA of the
teacher's word embeddings), on SST-2 alone (no augmented copies, so the teacher-output cache
fills in one pass over 67k sentences), trained 1,000 steps with loss (1 − α)·CE + α·T²·KL(teacher_T ‖ student_T) for
T ∈ {1, 4} and α ∈ {0.5, 0.9}, seeds 0–2: 12 points, about 2–3 min each on 2 CPU cores.
The sweep writes results.md / results.csv (mean ± std over seeds) and plots/ (a T × α
heatmap, training curves); experiments/README.md records what they showed.
"""

import itertools

from experiments import parse_args, sst2_minilm_students

TEMPERATURES = (1.0, 4.0)
ALPHAS = (0.5, 0.9)
SEEDS = (0, 1, 2)


def get_config(arg: str = ''):
  args = parse_args(arg, {'teacher': '<workdir>'}, 'experiments/sst2_kd_sweep.py')
  config = sst2_minilm_students.get_config(
    f'student=bilstm,teacher={args.get("teacher", "runs/minilm_teacher")}'
  )
  config.name = 'sst2_kd_sweep'
  config.stages = ('distill',)
  config.distill.augment_copies = 0
  # Hinton's objective alone (the students' default adds logit MSE): what is swept.
  config.loss.weights.logit_mse = 0.0
  config.loss.weights.ce = 1.0 - ALPHAS[0]
  config.loss.weights.kl = ALPHAS[0]
  config.loss.temperature = TEMPERATURES[0]
  config.train.student_steps = 1000
  config.train.eval_every = 500
  return config


def get_sweep():
  return [
    {
      'loss.temperature': t,
      'loss.weights.kl': alpha,
      'loss.weights.ce': round(1.0 - alpha, 6),
      'seed': seed,
    }
    for seed, t, alpha in itertools.product(SEEDS, TEMPERATURES, ALPHAS)
  ]
