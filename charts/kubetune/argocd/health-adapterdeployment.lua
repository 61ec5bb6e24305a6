-- Argo CD health check for kubetune.io/AdapterDeployment.
-- Install as argocd-cm key `resource.customizations.health.kubetune.io_AdapterDeployment` (see docs/argocd.md).
-- Written for Lua 5.1 (Argo CD's gopher-lua); every field may be missing, so every read is nil-checked.
local function num(n)
  if type(n) ~= "number" then
    return tostring(n)
  end
  if n == math.floor(n) and n > -1e15 and n < 1e15 then
    return string.format("%d", n)
  end
  return string.format("%.4g", n)
end

local function condition(status, kind)
  if type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if type(c) == "table" and c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function reason_message(c, fallback)
  if c == nil then
    return fallback
  end
  if c.reason ~= nil and c.message ~= nil and c.message ~= "" then
    return tostring(c.reason) .. ": " .. tostring(c.message)
  end
  if c.message ~= nil and c.message ~= "" then
    return tostring(c.message)
  end
  if c.reason ~= nil then
    return tostring(c.reason)
  end
  return fallback
end

-- Refusals that clear on their own once the source exists (a FineTuneJob still training, storage down):
-- the deployment waits. Any other refusal (digest mismatch, rank too high, wrong base model, source not
-- allowed) needs a spec change: Degraded.
local WAITING_REFUSALS = {
  SourceUnresolved = true,
  FineTuneJobNotFound = true,
  FineTuneJobNotReady = true,
  StorageUnavailable = true,
  ManifestMissing = true,
}

-- One note per alias that is rolling out a canary or retraining after drift.
local function adapter_notes(status)
  local notes = {}
  if type(status.adapters) ~= "table" then
    return notes
  end
  for _, a in ipairs(status.adapters) do
    if type(a) == "table" then
      local name = tostring(a.alias or a.name or "adapter")
      if type(a.canary) == "table" then
        local text = name .. ": canary " .. tostring(a.canary.version or a.canary.digest or "")
        if a.canaryWeight ~= nil then
          text = text .. " at " .. num(a.canaryWeight) .. "%"
        end
        if a.stepIndex ~= nil then
          text = text .. " (step " .. num(a.stepIndex) .. ")"
        end
        table.insert(notes, text)
      end
      local drift = a.drift
      if type(drift) == "table" and drift.state == "Retraining" then
        local text = name .. ": drift retraining"
        if type(drift.retrain) == "table" and drift.retrain.job ~= nil then
          text = text .. " (FineTuneJob " .. tostring(drift.retrain.job) .. ")"
        end
        table.insert(notes, text)
      elseif type(drift) == "table" and drift.state == "Drifted" then
        table.insert(notes, name .. ": drifted")
      end
    end
  end
  return notes
end

local hs = {}
local meta = obj.metadata or {}
local status = obj.status

if type(status) ~= "table" or next(status) == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the deployment"
  return hs
end
local generation = meta.generation
local observed = status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to act on generation " .. num(generation)
    .. " (observed " .. (observed ~= nil and num(observed) or "none") .. ")"
  return hs
end

local degraded = condition(status, "Degraded")
if is_true(degraded) then
  hs.status = "Degraded"
  hs.message = reason_message(degraded, "Degraded")
  return hs
end

local validated = condition(status, "Validated")
if validated ~= nil and validated.status == "False" and not WAITING_REFUSALS[validated.reason or ""] then
  hs.status = "Degraded"
  hs.message = reason_message(validated, "An adapter source is refused")
  return hs
end

local notes = adapter_notes(status)
local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")
local waiting = validated ~= nil and validated.status == "False"

if is_true(ready) and not is_true(progressing) and not waiting then
  hs.status = "Healthy"
  local n = type(status.adapters) == "table" and #status.adapters or 0
  local text = "Serving " .. num(n) .. " adapter" .. (n == 1 and "" or "s")
  if #notes > 0 then
    text = text .. "; " .. table.concat(notes, "; ")
  end
  hs.message = text
  return hs
end

local parts = {}
if waiting then
  table.insert(parts, "waiting for the adapter source: " .. reason_message(validated, "source not ready"))
end
if is_true(progressing) then
  table.insert(parts, reason_message(progressing, "rolling out"))
elseif ready ~= nil and not is_true(ready) then
  table.insert(parts, reason_message(ready, "not ready"))
end
for _, note in ipairs(notes) do
  table.insert(parts, note)
end
if #parts == 0 then
  table.insert(parts, tostring(status.phase or "Pending"))
end
hs.status = "Progressing"
hs.message = table.concat(parts, "; ")
return hs
