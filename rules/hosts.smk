# Several hosts, one storage (README: Building on devices). Every host runs the same workflow and
# config with the same storage options (e.g. --default-storage-provider fs --default-storage-prefix DIR):
#   build host:   snakemake artifacts                       ONNX variants, references, inputs -> storage
#   device hosts: snakemake engines --config devices=NAME   engines and validations -> storage
#   any host:     snakemake --config gather=true            the summary, with every device's rows
# On a cluster (profiles/slurm) `--config gather=true` makes every selected device's jobs, placed by
# their cluster hints.
import os


rule artifacts:
    """What device hosts build and validate from, for every device of the config."""
    input:
        kiln_workflow.artifact_targets(KILN),


rule engines:
    """This host's engines and validations (the devices it can build and run), without the summary."""
    input:
        kiln_workflow.validation_targets(KILN, HOST_CAN_RUN, HOST_CAN_BUILD),
        kiln_workflow.build_only_targets(KILN, HOST_CAN_RUN, HOST_CAN_BUILD),


localrules:
    artifacts,
    engines,


def in_storage(path):
    """Whether an artifact exists where this run reads it: the default storage, else this folder.

    Mirrors how Snakemake maps a plain path to the default storage provider (prefix + path).
    """
    s = workflow.storage_settings
    if s.default_storage_provider in (None, "none"):
        return os.path.exists(path)
    prefix = s.default_storage_prefix or ""
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    try:
        provider = workflow.storage_registry.default_storage_provider
        return provider.object(prefix + os.path.normpath(path)).exists()
    except Exception as err:  # an unfamiliar Snakemake: let it find out itself
        print(f"kiln: gather: cannot check storage for {path} ({err})", file=sys.stderr)
        return True


def gathered(wildcards):
    """Input function of the summary: no files, a check. With gather=true and jobs running on this
    host, the validations of devices this host cannot make must already be in storage; stop
    before any job if not, naming the devices and what to run on their hosts. With a cluster
    executor the nodes make them, so nothing is checked."""
    if not RUN["gather"] or not workflow.local_exec:
        return []
    missing = kiln_workflow.missing_elsewhere(KILN, HOST_CAN_RUN, HOST_CAN_BUILD, in_storage)
    if missing:
        message = kiln_workflow.missing_message(missing)
        if workflow.dryrun:
            print(message.replace("kiln: gather:", "kiln: gather (dry run):", 1), file=sys.stderr)
        else:
            raise WorkflowError(message)
    return []
