"""notebooks/quickstart.ipynb runs headless from top to bottom, so it cannot rot."""

import pathlib

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_runs_clean_and_shows_the_plots(tmp_path, monkeypatch, tfds_dir):
  monkeypatch.setenv('KDJAX_NOTEBOOK_WORKDIR', str(tmp_path / 'runs'))
  notebook = nbformat.read(REPO / 'notebooks' / 'quickstart.ipynb', as_version=4)
  # Raises CellExecutionError, naming the cell, if any cell fails.
  nbclient.NotebookClient(
    notebook, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}
  ).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  images = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(images) == 5  # heatmap + 4 training curves
  text = ''.join(o.get('text', '') for o in outputs)
  assert 'heatmap.png' in text and '| loss.temperature=4.0,loss.weights.kl=0.9 | 1 |' in text
  assert (tmp_path / 'runs' / 'sweep' / 'results.csv').is_file()
