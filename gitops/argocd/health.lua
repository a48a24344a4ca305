-- Argo CD health check for tuneloop.dev/FineTuneJob.
-- Installed as resource.customizations.health.tuneloop.dev_FineTuneJob in argocd-cm
-- (argocd-cm.yaml next to this file holds the same script; docs/gitops.md explains it).
--
-- It reads the conditions the Tuneloop operator writes on every reconcile:
--   status.observedGeneration behind metadata.generation  -> Progressing (not acted on yet)
--   Stalled=True      -> Degraded    (a person must fix something: see the message)
--   Reconciling=True  -> Progressing (a run is starting, training, evaluating or retrying)
--   Suspended=True    -> Suspended   (spec.suspend: true; set it to false, or let a queue do so)
--   awaiting approval -> Suspended   (annotate tuneloop.dev/approve=<run> or tuneloop.dev/reject=<run>)
--   Ready=True        -> Healthy
-- Base Lua only (Argo CD runs gopher-lua, Lua 5.1).

local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function isTrue(c)
  return c ~= nil and c.status == "True"
end

local function said(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

local status = obj.status
if status == nil or status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Tuneloop operator to pick up the job"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on generation " .. tostring(generation)
    .. " (it last acted on " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local stalled = condition(status, "Stalled")
if isTrue(stalled) then
  hs.status = "Degraded"
  hs.message = said(stalled, "The job cannot make progress")
  return hs
end

local reconciling = condition(status, "Reconciling")
if isTrue(reconciling) then
  hs.status = "Progressing"
  hs.message = said(reconciling, "A run is in progress")
  local run = status.currentRun
  if run ~= nil and run.progress ~= nil and run.progress.progressPercentage ~= nil then
    hs.message = hs.message .. " (" .. tostring(run.progress.progressPercentage) .. "% of run "
      .. tostring(run.number) .. ")"
  end
  return hs
end

local suspended = condition(status, "Suspended")
if isTrue(suspended) then
  hs.status = "Suspended"
  hs.message = said(suspended, "spec.suspend is true")
  return hs
end

local waiting = status.awaitingApproval
if waiting ~= nil and waiting.run ~= nil then
  hs.status = "Suspended"
  hs.message = "Run " .. tostring(waiting.run) .. " passed its gates and awaits approval: annotate "
    .. "tuneloop.dev/approve=" .. tostring(waiting.run) .. " or tuneloop.dev/reject=" .. tostring(waiting.run)
  return hs
end

local ready = condition(status, "Ready")
if isTrue(ready) then
  hs.status = "Healthy"
  hs.message = said(ready, "The job is at rest")
  return hs
end

-- A status written before the operator wrote Reconciling/Stalled, or one it is about to replace.
hs.status = "Progressing"
hs.message = said(ready, "Waiting for the Tuneloop operator")
return hs
