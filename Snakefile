# Kiln: PyTorch detection checkpoints -> ONNX -> precision variants -> engines per device -> validation.
from snakemake.utils import min_version

min_version("9.0")

# Landing page of `snakemake --report`; outputs marked report() fill it (rules/report.smk).
report: "report/workflow.rst"


# The bundled demo config, unless --configfile names others: those replace it rather
# than being merged into it (a user's models must not inherit the demo's).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/hosts.smk"


wildcard_constraints:
    model=r"[A-Za-z][A-Za-z0-9_-]*",
    device=r"[A-Za-z][A-Za-z0-9_-]*",
    dataset=r"[A-Za-z][A-Za-z0-9_-]*",
    opset=r"\d+",
    split=r"calib|val",
    precision=r"fp32|fp16-mixed|fp16|bf16|int8-mixed|int8|fp8-mixed|fp8|best",


include: "rules/data.smk"
include: "rules/onnx.smk"
include: "rules/precision.smk"
include: "rules/sensitivity.smk"
include: "rules/engines.smk"
include: "rules/baseline.smk"
include: "rules/diagnose.smk"
include: "rules/serve.smk"
include: "rules/report.smk"


rule all:
    input:
        summary_targets(),
        page_targets(),
        sensitivity_targets(),
        # Also as targets, so that one gone (a failed job's, a deleted one) is made again (README).
        made_here_targets(),
        serve_targets(),
    default_target: True
