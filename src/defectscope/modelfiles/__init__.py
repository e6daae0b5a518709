"""Model files and exported graphs: saving and loading detectors, export to ONNX/OpenVINO, running exported graphs."""
