"""Job and serve specs: pydantic models, frozen, built once from YAML at the edge."""

from clusterft.config.loader import SpecError, load_job_spec, parse_job_dict
from clusterft.config.spec import JobSpec

__all__ = ["JobSpec", "SpecError", "load_job_spec", "parse_job_dict"]
