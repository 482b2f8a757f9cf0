"""The device channel: the device-side OTA protocol over MQTT.

auth.py (CONNECT signatures), topics.py (topic names and the ACL), messages.py (payloads) are
pure; broker.py runs the embedded broker and talks to the services.
"""
