import os
import subprocess
import sys


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})


def test_toolkit_pins_torch_whatever_the_environment_says():
    result = _run("import toolkit, keras; print(keras.backend.backend(), keras.config.image_data_format())",
                  KERAS_BACKEND="jax")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "channels_first"]


def test_keras_loaded_on_another_backend_is_a_clear_error():
    # Another backend (jax, tensorflow) is not installed here, so stand in a Keras that reports one.
    code = ("import sys, types; keras = types.ModuleType('keras'); "
            "keras.backend = types.SimpleNamespace(backend=lambda: 'jax'); sys.modules['keras'] = keras; "
            "import toolkit")
    result = _run(code)
    assert result.returncode != 0
    assert "Keras was already imported on the 'jax' backend; mtk needs 'torch'" in result.stderr
