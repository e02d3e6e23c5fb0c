"""A paho-mqtt device that handles commands: `reboot` and `set_heartbeat_interval`.

It subscribes to its commands with QoS 1 and a persistent session (commands sent while it is
away reach it when it is back, until they expire), runs each command id once (a repeat is only
answered again), and replies on its replies topic. Run with DEVICE_ID, DEVICE_TOKEN and
MQTT_PORT set; it stops by itself after DURATION seconds.
"""

import json
import os
import time

import paho.mqtt.client as mqtt

device, port = os.environ.get("DEVICE_ID", "sensor-1"), int(os.environ.get("MQTT_PORT", "1884"))
interval = float(os.environ.get("INTERVAL", "5"))
done: dict[str, dict] = {}  # command id -> the reply sent (a repeat gets the same reply)


def run(command: dict) -> dict:
    global interval
    if command["name"] == "set_heartbeat_interval":
        interval = float(command["args"]["heartbeat_interval_s"])
        return {"status": "succeeded", "result": {"heartbeat_interval_s": interval}}
    if command["name"] == "reboot":
        return {"status": "succeeded", "result": {"rebooting_in_s": 1}}
    return {"status": "failed", "result": {"error": f"unknown command {command['name']}"}}


def on_message(client, userdata, message) -> None:
    command = json.loads(message.payload)
    if command["id"] not in done:
        done[command["id"]] = {"id": command["id"], **run(command)}
    client.publish(f"devices/{device}/replies", json.dumps(done[command["id"]]), qos=1)


client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311, clean_session=False
)
client.username_pw_set(device, os.environ["DEVICE_TOKEN"])
client.will_set(f"devices/{device}/status", "offline", qos=1)
client.on_connect = lambda c, *a: c.subscribe(f"devices/{device}/commands", qos=1)
client.on_message = on_message
client.connect("127.0.0.1", port, keepalive=30)
client.loop_start()
stop_at = time.monotonic() + float(os.environ.get("DURATION", "3600"))
seq = 0
while time.monotonic() < stop_at:
    beat = {"seq": seq, "msg_id": f"{device}-{time.time_ns()}", "interval_s": interval}
    client.publish(f"devices/{device}/heartbeat", json.dumps(beat), qos=1)
    seq += 1
    time.sleep(min(interval, max(stop_at - time.monotonic(), 0)))
client.disconnect()
client.loop_stop()
