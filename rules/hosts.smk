# Several hosts, one storage (README: Building on devices). Every host runs the same workflow and
# config with the same storage options (e.g. --default-storage-provider fs --default-storage-prefix DIR):
#   build host:   snakemake artifacts                       ONNX variants, references, inputs -> storage
#   device hosts: snakemake engines --config devices=NAME --allowed-rules build baseline validate diagnose engines
#                 engines and validations -> storage
#   any host:     snakemake --config gather=true            the summary, with every device's rows
# On a cluster (profiles/slurm) `--config cluster=true` makes every selected device's jobs, placed by
# their cluster hints.


rule artifacts:
    """What device hosts build and validate from, for every device of the config."""
    input:
        kiln_workflow.artifact_targets(KILN),


rule engines:
    """This host's engines and validations (the devices it can build and run), and the diagnoses of
    its TensorRT builds (rules/diagnose.smk), without the summary."""
    input:
        kiln_workflow.validation_targets(KILN, PLAN.host_can_run, PLAN.host_can_build),
        kiln_workflow.build_only_targets(KILN, PLAN.host_can_run, PLAN.host_can_build),
        lambda w: diagnosis_targets() if not (PLAN.run["gather"] or PLAN.run["cluster"]) else [],


localrules:
    artifacts,
    engines,

