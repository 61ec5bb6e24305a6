-- Argo CD health check for kubetune.io/FineTuneJob.
-- Install as argocd-cm key `resource.customizations.health.kubetune.io_FineTuneJob` (see docs/argocd.md).
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

local function metrics_text(m)
  if type(m) ~= "table" then
    return nil
  end
  local keys = {}
  for k, _ in pairs(m) do
    table.insert(keys, tostring(k))
  end
  if #keys == 0 then
    return nil
  end
  table.sort(keys)
  local parts = {}
  for _, k in ipairs(keys) do
    table.insert(parts, k .. " " .. num(m[k]))
  end
  return table.concat(parts, ", ")
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

local function reason_message(reason, message, fallback)
  if reason ~= nil and message ~= nil and message ~= "" then
    return tostring(reason) .. ": " .. tostring(message)
  end
  if message ~= nil and message ~= "" then
    return tostring(message)
  end
  if reason ~= nil then
    return tostring(reason)
  end
  return fallback
end

local hs = {}
local meta = obj.metadata or {}
local spec = obj.spec or {}
local status = obj.status

if type(status) ~= "table" or next(status) == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
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

local phase = status.phase
local run_policy = spec.runPolicy or {}

if phase == "Succeeded" then
  local adapter = status.adapter or {}
  local parts = {}
  if adapter.digest ~= nil then
    table.insert(parts, "adapter " .. tostring(adapter.digest) .. " published")
  else
    table.insert(parts, "training succeeded")
  end
  local m = metrics_text(adapter.metrics)
  if m ~= nil then
    table.insert(parts, m)
  end
  hs.status = "Healthy"
  hs.message = table.concat(parts, "; ")
  return hs
end

if phase == "Skipped" then
  local baseline = status.baseline or {}
  hs.status = "Healthy"
  if baseline.summary ~= nil then
    hs.message = "Base model meets the target (" .. tostring(baseline.summary) .. "); training skipped"
  else
    hs.message = "Base model meets the target; training skipped"
  end
  return hs
end

if phase == "Failed" then
  local failure = status.failure or {}
  local text = reason_message(failure.reason, failure.message, nil)
  if text == nil then
    local c = condition(status, "Failed")
    if c ~= nil then
      text = reason_message(c.reason, c.message, nil)
    end
  end
  hs.status = "Degraded"
  hs.message = text or "The job failed"
  return hs
end

if phase == "Suspended" or run_policy.suspend == true then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.runPolicy.suspend)"
  if phase ~= nil and phase ~= "Suspended" then
    hs.message = hs.message .. " in phase " .. tostring(phase)
  end
  return hs
end

if phase == nil or phase == "Pending" or phase == "Queued" or phase == "Validating" or phase == "Baseline"
    or phase == "Sweeping" or phase == "Running" or phase == "Publishing" then
  local parts = { tostring(phase or "Pending") }
  if phase == "Queued" then
    -- waiting for Kueue's admission: progressing (nothing failed), in Kueue's words
    local c = condition(status, "Queued")
    if c ~= nil then
      table.insert(parts, reason_message(c.reason, c.message, "waiting for Kueue"))
    end
  elseif phase == "Validating" then
    local data = status.data or {}
    table.insert(parts, "data stage " .. tostring(data.state or "Pending"))
  elseif phase == "Baseline" then
    local baseline = status.baseline or {}
    if baseline.summary ~= nil then
      table.insert(parts, "baseline " .. tostring(baseline.summary))
    elseif baseline.state ~= nil then
      table.insert(parts, "baseline evaluation " .. tostring(baseline.state))
    end
  elseif phase == "Sweeping" then
    local sweep = status.sweep or {}
    if sweep.summary ~= nil then
      table.insert(parts, "rank sweep " .. tostring(sweep.summary))
    elseif sweep.state ~= nil then
      table.insert(parts, "rank sweep " .. tostring(sweep.state))
    end
  end
  local progress = status.progress or {}
  if phase == "Running" or phase == "Publishing" then
    if progress.percent ~= nil then
      table.insert(parts, num(progress.percent) .. "%")
    end
    if progress.step ~= nil then
      local step = "step " .. num(progress.step)
      if progress.totalSteps ~= nil then
        step = step .. "/" .. num(progress.totalSteps)
      end
      table.insert(parts, step)
    end
    if progress.stage ~= nil then
      table.insert(parts, tostring(progress.stage))
    end
    if progress.evalLoss ~= nil then
      table.insert(parts, "eval loss " .. num(progress.evalLoss))
    end
  end
  hs.status = "Progressing"
  hs.message = table.concat(parts, ", ")
  return hs
end

hs.status = "Unknown"
hs.message = "Unknown phase " .. tostring(phase)
return hs
