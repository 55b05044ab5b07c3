"""Run inside the namespace: talk to the installed service as a user would,
with the official openai client. Prints one JSON line of what it saw."""

import json
import sys

import openai

endpoint, key, model = sys.argv[1:4]
result = {}
client = openai.OpenAI(base_url=endpoint, api_key=key, max_retries=0, timeout=120)
resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour."}],
                                      max_tokens=24, temperature=0)
result["text"] = resp.choices[0].message.content
result["model"] = resp.model
try:
    openai.OpenAI(base_url=endpoint, api_key="sk-wrong", max_retries=0, timeout=30).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    result["wrong_key_status"] = 200
except openai.APIStatusError as e:
    result["wrong_key_status"] = e.status_code
print(json.dumps(result))
