"""dlmin's numerical core: constructions, network derivatives, flows, storage.

The public names below are loaded on first use, so importing one module
(``dlmin.core.spec`` for a quick ``validate``) does not pull in SciPy or h5py.
Nothing here prints; results come back as objects and progress through an
optional callback.
"""

from importlib import import_module

_PUBLIC = {
    # data
    "Dataset": "data",
    "clusters": "data",
    "load_file": "data",
    "load_sklearn": "data",
    # truncation maps
    "truncate": "truncation",
    "truncation_chain": "truncation",
    "cumulative_from_layers": "truncation",
    "layers_from_cumulative": "truncation",
    # constructions
    "build_clustered": "construct",
    "clustered_conditions": "construct",
    "fit_output": "construct",
    "cost": "construct",
    "cost_split": "construct",
    "build_clustered_reduced": "reduced",
    "build_sls": "sls",
    "find_sls_order": "sls",
    "make_sls_data": "sls",
    "build_shallow": "shallow",
    "ls_value": "shallow",
    "delta_P": "shallow",
    "build_collapse_keep": "family",
    "all_patterns": "family",
    # network derivatives
    "forward": "network",
    "jacobian": "network",
    "jvp": "network",
    "vjp": "network",
    "ntk": "network",
    "init_params": "network",
    "flatten": "network",
    "unflatten": "network",
    # flows
    "FlowOptions": "flows",
    "integrate": "flows",
    "velocity": "flows",
    # the landscape around a minimizer
    "random_direction": "landscape",
    "slice_costs": "landscape",
    "plane_costs": "landscape",
    "run_trials": "landscape",
    # specs, runs and files
    "load_spec": "spec",
    "plan": "spec",
    "SpecError": "spec",
    "SpecErrors": "spec",
    "execute": "runs",
    "load": "store",
    "load_network": "predict",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'dlmin.core' has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
