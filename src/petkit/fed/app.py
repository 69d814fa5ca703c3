"""Module-level Flower apps for the deployment engine (`flwr run`): they read the recipe from the
run config key `recipe-yaml`, which `petkit fed --deploy` writes into the app's pyproject.toml.

    [tool.flwr.app.components]
    serverapp = "petkit.fed.app:server_app"
    clientapp = "petkit.fed.app:client_app"
"""

from petkit.fed.client import make_client_app
from petkit.fed.server import make_server_app

server_app = make_server_app()
client_app = make_client_app()
