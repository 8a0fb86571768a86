"""What the TensorRT and TensorRT-RTX backends share, written once, one module per concern.

Both backends parse an ONNX file into a TensorRT network, configure a builder, serialize the
plan and describe it; they differ in which Python module they drive (``tensorrt`` or
``tensorrt_rtx``), whether precision comes from builder flags (TensorRT < 11) or from the
variant ONNX alone (strongly typed), and where an engine may be built and run. Everything
here takes a *flavor*, ``"tensorrt"`` or ``"tensorrt-rtx"``, and a TensorRT module passed as
``trt`` so that one code path serves both.

The build goes through Polygraphy (``create_network``, ``CreateConfig`` /
``CreateConfigRTX``, ``PostprocessConfig``, ``engine_bytes_from_network``). Polygraphy picks
its TensorRT module once per process from ``POLYGRAPHY_USE_TENSORRT_RTX``;
:func:`kiln.backends.trt.importer.polygraphy_trt` binds it to the flavor asked for (see there).
The engine file is the serialized plan exactly as the builder returned it: no header or metadata
is prepended, so ``trtexec --loadEngine``, Polygraphy and any TensorRT runtime read it as it is.
What Kiln knows about the build goes into the returned metadata and ``layers.json`` instead.

Host description (:func:`kiln.backends.trt.host.detect_host`) and the device guard
(:func:`kiln.backends.trt.host.guard`) never need a GPU: without one they report "no GPU"
rather than fail.

The modules, each importing only those listed before it:

* ``importer``: the TensorRT / TensorRT-RTX module of this host, version helpers, and Polygraphy
  bound to one flavor, with its log.
* ``host``: what this machine offers (GPU, driver, Jetson, TensorRT), the device guard and the
  timing-cache key.
* ``profile``: the ONNX inputs and the optimization profiles of a build.
* ``parser``: the ONNX parser, with every refusal named by node and op.
* ``layers``: ``layers.json``, from the engine inspector or the parsed network.
* ``builder``: the builder configuration, the build itself, and the device settings that change
  an engine.
* ``io``: engine I/O tensors, their profiles, and their host storage (bf16, fp8 conversions).
* ``cuda``: ``cuda.bindings.runtime`` with checked results, CUDA graph capture, buffers.
* ``runner``: :class:`kiln.backends.trt.runner.TrtEngineRunner`, an engine behind the Runner
  surface plus what the latency measurement needs.

Nothing is imported here: import the module that holds the name, so that a stage's code
fingerprint follows only the concerns it uses.
"""
