"""RPC action handlers, one module per resource. Each module lists its actions in ACTIONS."""

from otaplane.openapi.actions import devices, firmware, jobs, modules, products

ALL_ACTIONS = (*products.ACTIONS, *modules.ACTIONS, *firmware.ACTIONS, *devices.ACTIONS, *jobs.ACTIONS)
