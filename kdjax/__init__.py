"""kdjax: knowledge distillation and model compression for NLP in JAX/Flax.

The Python API (kdjax/api.py) is reachable from the package, loaded on first use so that
`import kdjax` stays cheap (no JAX): `kdjax.train(config, workdir)`, `kdjax.evaluate(model_dir,
sentences=... | split=...)`, `kdjax.sweep_run(experiment, workdir)`, `kdjax.load_model(dir)`.

`kdjax.train` and `kdjax.evaluate` are also submodules (`from kdjax import train;
train.run(...)`), and importing a submodule binds it on the package under the same name. So
the package binds those two submodules as callable modules: `kdjax.train(...)` calls the API
function and `kdjax.train.run` is still the module's function, whichever is imported first.
"""

import sys
import types

__version__ = '0.1.0'

_API = ('train', 'evaluate', 'sweep_run', 'load_model', 'load_config')
_API += ('RunResult', 'Evaluation', 'SweepResult', 'Model')
_CALLABLE_SUBMODULES = ('train', 'evaluate')


class _CallableModule(types.ModuleType):
  """A submodule that, called, runs the API function of the same name."""

  def __call__(self, *args, **kwargs):
    from kdjax import api

    return getattr(api, self.__name__.rsplit('.', 1)[1])(*args, **kwargs)


class _Package(types.ModuleType):
  def __setattr__(self, name, value):
    # The import system binds `kdjax.<submodule>` here after loading it.
    if name in _CALLABLE_SUBMODULES and type(value) is types.ModuleType:
      value.__class__ = _CallableModule
    super().__setattr__(name, value)

  def __getattr__(self, name):
    if name in _CALLABLE_SUBMODULES:
      import importlib

      return importlib.import_module(f'{__name__}.{name}')  # binds it through __setattr__
    if name in _API:
      from kdjax import api

      return getattr(api, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

  def __dir__(self):
    return sorted(set(super().__dir__()) | set(_API))


sys.modules[__name__].__class__ = _Package
