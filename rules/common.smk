# Shared helpers: the checked config, path patterns, input functions and targets.
import sys

sys.path.insert(0, workflow.basedir)

from kiln import fingerprint as kiln_fingerprint, paths, workflow as kiln_workflow
from kiln import build as kiln_build, dataset as kiln_dataset, export as kiln_export
from kiln import inputs as kiln_inputs, precision as kiln_precision, reference as kiln_reference
from kiln import simplify as kiln_simplify, surgery as kiln_surgery, validate as kiln_validate

RUN = kiln_workflow.run_options_or_exit(config)  # --config gather=true / cluster=true (rules/hosts.smk)
KILN = kiln_workflow.load_or_exit(config, workflow.configfiles)
# What this host can do per device: build engines, and run them (validate).
CAN_BUILD = kiln_workflow.buildable(KILN)
CAN_RUN = kiln_workflow.runnable(KILN)
# gather=true / cluster=true: every device's rows, made by other hosts (put in storage) or by the
# executor's nodes (rules/hosts.smk, README: Building on devices). HOST_CAN_* keep this host's own.
HOST_CAN_BUILD, HOST_CAN_RUN = CAN_BUILD, CAN_RUN
if RUN["gather"] or RUN["cluster"]:
    CAN_BUILD = CAN_RUN = kiln_workflow.everywhere(KILN)
# The devices whose engines (BUILD_HERE) and validations and baselines (RUN_HERE) rules may make
# in this run: with gather=true only this host's, so other hosts' outputs in storage are taken
# as they are (never re-made here, whatever their mtimes); otherwise any device.
BUILD_HERE = kiln_workflow.device_pattern(HOST_CAN_BUILD if RUN["gather"] else None)
RUN_HERE = kiln_workflow.device_pattern(
    {d: HOST_CAN_RUN[d] or HOST_CAN_BUILD[d] for d in KILN.devices} if RUN["gather"] else None
)
# The profile's default partition, for build/validate jobs no device hint places: a rule's
# resource replaces the default-resources value for all of the rule's jobs.
DEFAULT_PARTITION = kiln_workflow.default_resource(workflow.resource_settings.default_resources, "slurm_partition")


def P(pattern, **values):
    """A path pattern with the results folder filled and other fields left as wildcards."""
    return paths.partial(pattern, results=KILN.results, **values)


def LOG(rule, name):
    return P(paths.LOG, rule=rule, name=name)


def code(stage):
    """Tracked param: fingerprint of a stage module and the kiln code it imports."""
    return kiln_fingerprint.code_fingerprint(stage)


def device_code(stage):
    """Like code(), plus the device's backend module (imported by name, so not seen statically)."""
    return lambda w: kiln_fingerprint.code_fingerprint(
        stage, kiln_workflow.backends.BACKENDS[KILN.devices[w.device].backend]
    )


def dataset_of(model, split, pattern=paths.DATASET):
    return P(pattern, dataset=KILN.models[model].dataset, split=split)


def engine_source(w):
    """The precision-variant ONNX a device's backend builds this engine from."""
    d = KILN.devices[w.device]
    src = kiln_workflow.backends.get(d.backend).source_precision(w.precision, d)
    return P(paths.VARIANT, model=w.model, opset=d.opset, precision=src)


def gathered(wildcards):
    """Summary input: no files. With gather=true, a check that storage has what this host cannot make."""
    return kiln_workflow.check_gathered(workflow, KILN, HOST_CAN_RUN, HOST_CAN_BUILD) if RUN["gather"] else []


def made_here_targets():
    """Engines and validations this run makes (gather=true: of this host's devices), also targets of `all`."""
    if RUN["gather"]:
        return kiln_workflow.made_here_targets(KILN, HOST_CAN_RUN, HOST_CAN_BUILD)
    return kiln_workflow.made_here_targets(KILN, CAN_RUN, CAN_BUILD)


def summary_targets():
    return [P(paths.SUMMARY_JSON), P(paths.SUMMARY_CSV), P(paths.SUMMARY_MD)]


def page_targets():
    return [P(paths.PAGE_HTML), P(paths.PAGE_MD)]
