"""The guest image recipes (kernel fragment and required options, host and guest
package lists, the guest's ``/init`` and sshd configuration).

Not code: this folder is installed as the package ``harness.images.recipes`` (see
``[tool.setuptools]`` in pyproject.toml) so that the harness reads its recipes
through ``importlib.resources`` from a wheel and from a checkout alike.
"""
