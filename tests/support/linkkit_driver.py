"""A device built on the real Python device SDK, aliyun-iot-linkkit (unmodified), for the end-to-end
test. Runs in its own venv (linkkit needs paho-mqtt < 2), driven by one JSON argument:

    {"host", "port", "product_key", "device_name", "device_secret", "module", "workdir"}

It prints one `@@{json}` line per step; the test reads them (other output is the SDK's logging):
connected -> reported 1.0.0 -> (waits for a line on stdin, then for the push) ota(type 1) -> downloaded -> progress ->
ota(type 2, the firmware/get answer) -> reported <new version> -> done.
"""

import hashlib
import json
import os
import queue
import sys
import time

from linkkit import linkkit

TIMEOUT_S = 60


def say(event, **fields):
    print("@@" + json.dumps({"event": event, **fields}), flush=True)


def main():
    args = json.loads(sys.argv[1])
    module = args["module"]
    product_key, device_name = args["product_key"], args["device_name"]
    connected = queue.Queue()
    notices = queue.Queue()

    lk = linkkit.LinkKit(host_name=args["host"], product_key=product_key, device_name=device_name,
                         device_secret=args["device_secret"])
    lk.config_mqtt(port=args["port"], secure="", keep_alive=60)

    def on_connect(session_flag, rc, userdata):
        connected.put(rc)

    def on_ota_message_arrived(ota_notice_type, version, size, url, sign_method, sign, module_name, extra):
        notices.put(dict(type=ota_notice_type, version=version, size=size, url=url, sign_method=sign_method,
                         sign=sign, module=module_name, extra=extra))

    lk.on_connect = on_connect
    lk.on_ota_message_arrived = on_ota_message_arrived
    lk.connect_async()
    rc = connected.get(timeout=TIMEOUT_S)
    say("connected", rc=rc)

    lk.ota_report_version(module, "1.0.0")  # returns OTA_PUB_FAILED even on success: ignored
    say("reported", version="1.0.0", module=module)
    sys.stdin.readline()  # the test has looked at the device: go on

    push = notices.get(timeout=TIMEOUT_S)
    say("ota", **push)

    path = os.path.join(args["workdir"], "firmware.bin")
    rc = lk.download_ota_firmware(push["url"], path, push["sign_method"], push["sign"])
    with open(path, "rb") as handle:
        content = handle.read()
    say("downloaded", ok=rc == linkkit.LinkKit.ErrorCode.SUCCESS, rc=str(rc), size=len(content),
        md5=hashlib.md5(content).hexdigest(), sha256=hashlib.sha256(content).hexdigest())

    progress = {"id": "1", "params": {"step": "100", "desc": "", "module": module}}
    rc, mid = lk.publish_topic("/ota/device/progress/%s/%s" % (product_key, device_name), json.dumps(progress), 1)
    say("progress", rc=rc, step=100)
    time.sleep(0.5)

    lk.query_ota_firmware(module)
    answer = notices.get(timeout=TIMEOUT_S)
    say("ota", **answer)

    lk.ota_report_version(module, push["version"])
    say("reported", version=push["version"], module=module)
    time.sleep(1)
    lk.disconnect()
    say("done")


if __name__ == "__main__":
    try:
        main()
    except Exception as problem:  # the test shows this line
        say("error", error=repr(problem))
    sys.stdout.flush()
    os._exit(0)  # the SDK's threads would keep the process alive
