"""The bottom of the house: what every layer of the project agrees on.

- `specs`: every served model's tensors (names, dtypes, shapes) and batch limits,
  and MuseTalk's constants (sample rate, audio steps, face size...).
- `layout`: where an export puts each model in a Triton model repository, and
  what the ONNX files record about themselves (the export key, synthetic weights,
  the CPU bf16 gate's verdict).
- `runners`: how an ONNX file is run outside Triton's onnxruntime backend
  (onnxruntime or OpenVINO, fp32 or bf16), so that the bf16 gate measures exactly
  what the local server serves.
- `priority`: whose requests Triton serves first (a session's first frames ... an
  avatar's preparation), the levels every model config declares.
- `logs`: how every process of the project logs (time, level, logger, the request,
  session and tenant a line belongs to; text or JSON).

It needs only numpy (onnx, onnxruntime and OpenVINO are imported by the
functions that use them), so the client SDK, the exporter, the local server
and the front end can all depend on it without pulling each other in.
"""
