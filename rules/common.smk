# Shared helpers: the checked config, path patterns, input functions and targets.
import sys

sys.path.insert(0, workflow.basedir)

# Every kiln import of the workflow, in one place.
from kiln import paths, workflow as kiln_workflow
from kiln import baseline as kiln_baseline, build as kiln_build, dataset as kiln_dataset
from kiln import diagnose as kiln_diagnose, export as kiln_export, inputs as kiln_inputs
from kiln import precision as kiln_precision, reference as kiln_reference, simplify as kiln_simplify
from kiln import sensitivity as kiln_sensitivity, serve as kiln_serve, summary as kiln_summary
from kiln import surgery as kiln_surgery
from kiln import validate as kiln_validate

# The host plan, once: the checked config, this host's devices (build, run), gather/cluster switches,
# code fingerprints and resources of every job, from kiln/workflow.py Plan (README, Building on devices).
PLAN = kiln_workflow.Plan.create(config, workflow.configfiles, workflow.resource_settings.default_resources)
KILN = PLAN.cfg


def P(pattern, **values):
    """A path pattern with the results folder filled and other fields left as wildcards."""
    return paths.partial(pattern, results=KILN.results, **values)


def LOG(rule, name):
    return P(paths.LOG, rule=rule, name=name)


def dataset_of(model, split, pattern=paths.DATASET):
    return P(pattern, dataset=KILN.models[model].dataset, split=split)


def engine_source(w):
    """The precision-variant ONNX a device's backend builds this engine from."""
    return PLAN.engine_source(w.device, w.model, w.precision)


def gathered(wildcards):
    """Summary input: no files. With gather=true, a check that storage has what this host cannot make."""
    if not PLAN.run["gather"]:
        return []
    return kiln_workflow.check_gathered(workflow, KILN, PLAN.host_can_run, PLAN.host_can_build)


def diagnosis_targets():
    """One diagnosis per job of a device whose backend diagnoses failed builds (rules/diagnose.smk)."""
    return kiln_diagnose.targets(KILN, PLAN.can_build)


def serve_targets():
    """Triton repository and DeepStream configs of every device whose engines this run builds (rules/serve.smk);
    with gather=true only this host's devices, like every other per-device output made here."""
    return kiln_serve.targets(KILN, PLAN.host_can_build if PLAN.run["gather"] else PLAN.can_build)


def made_here_targets():
    """Engines and validations this run makes (gather=true: of this host's devices), also targets of `all`."""
    if PLAN.run["gather"]:
        return kiln_workflow.made_here_targets(KILN, PLAN.host_can_run, PLAN.host_can_build)
    return kiln_workflow.made_here_targets(KILN, PLAN.can_run, PLAN.can_build)


def summary_targets():
    return [P(paths.SUMMARY_JSON), P(paths.SUMMARY_CSV), P(paths.SUMMARY_MD)]


def sensitivity_targets():
    """Sensitivity tables asked for (models.<m>.sensitivity.precisions) or needed by a mixed variant."""
    return kiln_sensitivity.targets(KILN)


def page_targets():
    return [P(paths.PAGE_HTML), P(paths.PAGE_MD)]
