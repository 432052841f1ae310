import json

import numpy as np
import pytest

from fifa_hf.storage import strict_json


def test_results_are_strict_json_with_undefined_statistics_as_null():
    results = {"ci": [float("nan"), 2.5], "sd": np.float32("nan"), "mean": np.array(np.inf), "runs": np.int64(3)}

    def not_json(constant):
        raise ValueError(f"{constant} is not JSON")

    written = json.loads(strict_json(results), parse_constant=not_json)
    assert written == {"ci": [None, 2.5], "sd": None, "mean": None, "runs": 3}
    with pytest.raises(ValueError, match="NaN is not JSON"):
        json.loads(json.dumps(results, default=float), parse_constant=not_json)  # what json.dumps writes
